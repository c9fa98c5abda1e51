// The visitor demo: a customer's page with presence, the terms dialog and sessions.
import { VisitorClient } from "/js/herald.js";
import { byId, demoCredential, demoGroup, fragment, say } from "/static/pages.js";

/** @type {VisitorClient | null} */
let client = null;

function setConnection(state, text) {
  byId("connection").dataset.state = state;
  byId("connection-text").textContent = text;
}

function sessionStatus(text) {
  say(byId("session-status"), text);
}

/** Show the live session: its code (random key) and how many agents are in it. */
function showSession(session) {
  byId("end-session").hidden = !session;
  byId("code-box").hidden = !session?.show_key;
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
  try {
    await client.terms(status);
    if (status === "accepted") showSession(await client.startSession("visitor"));
    else sessionStatus("You declined. Nothing is shared.");
  } catch (error) {
    byId("error").textContent = `Could not answer: ${error.message}`;
  }
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

async function endSession() {
  try {
    await client.endSession();
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
  await client?.close();
  client = new VisitorClient(undefined, { group, visitor, token });
  client.addEventListener("connected", () => setConnection("connected", `Connected as ${visitor}`));
  client.addEventListener("disconnected", ({ detail }) =>
    setConnection("idle", detail.reconnecting ? "Reconnecting…" : "Offline"));
  client.addEventListener("stopped", ({ detail }) => {
    if (detail.failure) byId("error").textContent = `Disconnected: ${detail.failure.message}`;
  });
  client.addEventListener("signal", onSignal);
  client.addEventListener("session_connected", ({ detail }) => showSession(detail));
  client.addEventListener("guest_count", () => showSession(client.session));
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
  byId("end-session").addEventListener("click", endSession);
  const given = fragment();
  const demo = await demoGroup();
  byId("visitor-id").value = given.get("visitor") || "cust-42";
  if (demo) byId("identity-hint").textContent = `Demo mode: Herald signs this ID for the "${demo}" group.`;
  document.body.dataset.ready = "true";
  if (given.get("visitor") || demo) await connect();
}

start();
