// The visitor demo: a customer's page with presence, the terms dialog, sessions and screen sharing.
//
// Consent stays explicit: the screen is captured only from a click of the visitor's (Accept, or
// Share this tab), never before; declining, stopping, or the session ending stops every track.
import { ScreenShare, VisitorClient } from "/js/herald.js";
import { byId, demoCredential, demoGroup, fragment, say } from "/static/pages.js";

/** @type {VisitorClient | null} */
let client = null;
/** @type {ScreenShare | null} */
let share = null;
const SHARE_ENDED = {
  stopped: "You stopped sharing.", capture_ended: "You stopped sharing.", agent: "The agent ended the screen sharing.",
  declined: "You declined. Nothing is shared.", session_ended: "Sharing stopped: the session ended.",
  disconnected: "Sharing stopped: the connection was lost.",
};

function setConnection(state, text) {
  byId("connection").dataset.state = state;
  byId("connection-text").textContent = text;
}

function sessionStatus(text) {
  say(byId("session-status"), text);
}

function shareStatus(text) {
  say(byId("share-status"), text);
}

/** The share buttons: Share while a session is live and nothing is shared, Stop while sharing. */
function showShareButtons() {
  const sharing = Boolean(share?.sharing);
  byId("share").hidden = sharing || !client?.session;
  byId("stop-share").hidden = !sharing;
}

/** Share what was captured (a MediaStream), or say why nothing is (an error: the visitor said no). */
async function startSharing(captured) {
  if (captured instanceof Error) {
    shareStatus(captured.name === "NotAllowedError" ? "You did not share a tab: nothing is shared." : `Could not share: ${captured.message}`);
    showShareButtons();
    return;
  }
  try {
    await share.start(captured);
  } catch (error) {
    shareStatus(`Could not share: ${error.message}`);
  }
  showShareButtons();
}

/** Ask the browser for this tab: called from the visitor's click, as browsers require. */
function capture() {
  return ScreenShare.capture().catch((error) => (error instanceof Error ? error : new Error(String(error))));
}

function stopTracks(captured) {
  if (!(captured instanceof Error)) captured.getTracks().forEach((track) => track.stop());
}

/** Show the live session: its code (random key) and how many agents are in it. */
function showSession(session) {
  byId("end-session").hidden = !session;
  byId("code-box").hidden = !session?.show_key;
  showShareButtons();
  if (!session) return;
  if (session.show_key) byId("session-code").textContent = session.key;
  const guests = session.guests;
  sessionStatus(
    guests
      ? `${guests} agent${guests === 1 ? " is" : "s are"} with you.`
      : session.show_key ? "Read this code out to your agent." : "Waiting for an agent to join…",
  );
}

async function answerTerms(status) {
  const dialog = byId("terms-dialog");
  if (dialog.open) dialog.close();
  // The click on Accept is the consent, and the user gesture the browser asks for: capture now.
  const captured = status === "accepted" ? capture() : null;
  if (status !== "accepted") share?.stop("declined");
  try {
    await client.terms(status);
    if (status !== "accepted") {
      sessionStatus("You declined. Nothing is shared.");
      return;
    }
    showSession(await client.startSession("visitor"));
  } catch (error) {
    if (captured) stopTracks(await captured);
    byId("error").textContent = `Could not answer: ${error.message}`;
    return;
  }
  await startSharing(await captured);
}

/** Resolves once this page is on screen: at once when it is, else when its tab is shown. */
function onScreen() {
  if (document.visibilityState === "visible") return Promise.resolve();
  return new Promise((resolve) => {
    const shown = () => {
      if (document.visibilityState !== "visible") return;
      document.removeEventListener("visibilitychange", shown);
      resolve();
    };
    document.addEventListener("visibilitychange", shown);
  });
}

async function onSignal({ detail: signal }) {
  if (signal.event !== "showterms") return;
  const dialog = byId("terms-dialog");
  if (!dialog.open) dialog.showModal();
  byId("accept").focus();
  // "displayed" tells the agent the visitor sees the dialog: a tab in the background waits until it is shown.
  await onScreen();
  if (!dialog.open) return; // answered meanwhile: the answer said more
  try {
    await client.terms("displayed");
  } catch (error) {
    byId("error").textContent = `Could not tell the agent: ${error.message}`;
  }
}

async function cobrowse() {
  byId("cobrowse").disabled = true;
  try {
    showSession(await client.startSession("random"));
  } catch (error) {
    byId("error").textContent = `Could not start: ${error.message}`;
  } finally {
    byId("cobrowse").disabled = false;
  }
}

async function shareTab() {
  await startSharing(await capture());
}

async function endSession() {
  try {
    await client.endSession(); // the share stops with it (session_ended)
    showSession(null);
    sessionStatus("Session ended.");
  } catch (error) {
    byId("error").textContent = `Could not end: ${error.message}`;
  }
}

async function connect(event) {
  event?.preventDefault();
  const given = fragment();
  const visitor = byId("visitor-id").value.trim();
  const group = given.get("group") || (await demoGroup());
  const fixed = given.get("token");
  byId("error").textContent = "";
  if (!group || (!fixed && group !== (await demoGroup()))) {
    byId("error").textContent = "Open this page with #group=…&visitor=…&token=… (a visitor token from your back end).";
    return;
  }
  // Demo mode: Herald mints a fresh visitor token for every (re)connect.
  const token = fixed || (async () => (await demoCredential("visitor", visitor)).token);
  share?.close();
  await client?.close();
  client = new VisitorClient(undefined, { group, visitor, token });
  share = new ScreenShare(client);
  share.addEventListener("sharing", () => {
    shareStatus("You are sharing this tab.");
    showShareButtons();
  });
  share.addEventListener("viewers", ({ detail }) => {
    if (!share.sharing) return;
    const count = detail.count;
    shareStatus(count ? `${count} agent${count === 1 ? " sees" : "s see"} this tab.` : "You are sharing this tab.");
  });
  share.addEventListener("ended", ({ detail }) => {
    shareStatus(SHARE_ENDED[detail.reason] || "Sharing stopped.");
    showShareButtons();
  });
  client.addEventListener("connected", () => setConnection("connected", `Connected as ${visitor}`));
  client.addEventListener("disconnected", ({ detail }) =>
    setConnection("idle", detail.reconnecting ? "Reconnecting…" : "Offline"));
  client.addEventListener("stopped", ({ detail }) => {
    if (detail.failure) byId("error").textContent = `Disconnected: ${detail.failure.message}`;
  });
  client.addEventListener("signal", onSignal);
  client.addEventListener("session_connected", ({ detail }) => showSession(detail));
  client.addEventListener("guest_count", () => showSession(client.session));
  client.addEventListener("session_ended", () => showSession(client.session));
  client.trackPage();
  setConnection("idle", "Connecting…");
  try {
    await client.connect();
  } catch (error) {
    setConnection("failed", "Not connected");
    byId("error").textContent = `Could not connect: ${error.message}`;
  }
}

async function start() {
  byId("identity-form").addEventListener("submit", connect);
  byId("accept").addEventListener("click", () => answerTerms("accepted"));
  byId("decline").addEventListener("click", () => answerTerms("declined"));
  byId("terms-dialog").addEventListener("cancel", (event) => {
    event.preventDefault(); // Escape declines rather than leaving the agent without an answer
    answerTerms("declined");
  });
  byId("cobrowse").addEventListener("click", cobrowse);
  byId("share").addEventListener("click", shareTab);
  byId("stop-share").addEventListener("click", () => share?.stop());
  byId("end-session").addEventListener("click", endSession);
  const given = fragment();
  const demo = await demoGroup();
  byId("visitor-id").value = given.get("visitor") || "cust-42";
  if (demo) byId("identity-hint").textContent = `Demo mode: Herald signs this ID for the "${demo}" group.`;
  document.body.dataset.ready = "true";
  if (given.get("visitor") || demo) await connect();
}

start();
