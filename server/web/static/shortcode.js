// The consumer short-code flow: create a code, redeem it, show it, join as the session's visitor.
import { VisitorClient, createShortCode } from "/js/herald.js";
import { byId, demoGroup, fragment, say } from "/static/pages.js";

/** @type {VisitorClient | null} */
let client = null;

function setConnection(state, text) {
  byId("connection").dataset.state = state;
  byId("connection-text").textContent = text;
}

function showGuests(session) {
  const guests = session?.guests || 0;
  say(byId("status"), guests ? `${guests} agent${guests === 1 ? " is" : "s are"} with you.` : "Waiting for your agent…");
}

async function getCode(event) {
  event.preventDefault();
  const group = byId("group").value.trim();
  byId("error").textContent = "";
  byId("get-code").disabled = true;
  try {
    await client?.close();
    // Create and redeem at once (a code is redeemable once), then show it.
    const { code, sessionToken } = await createShortCode(undefined, group);
    byId("session-code").textContent = code;
    byId("code-box").hidden = false;
    say(byId("status"), "Read the code out to your agent.");
    client = VisitorClient.forSession(undefined, group, sessionToken);
    client.addEventListener("connected", () => setConnection("connected", "Connected"));
    client.addEventListener("disconnected", ({ detail }) =>
      setConnection("idle", detail.reconnecting ? "Reconnecting…" : "Offline"));
    client.addEventListener("session_connected", ({ detail }) => showGuests(detail));
    client.addEventListener("guest_count", () => showGuests(client.session));
    await client.connect();
  } catch (error) {
    byId("error").textContent = `Could not get a code: ${error.message}`;
  } finally {
    byId("get-code").disabled = false;
  }
}

async function start() {
  byId("code-form").addEventListener("submit", getCode);
  byId("group").value = fragment().get("group") || (await demoGroup()) || "";
  document.body.dataset.ready = "true";
}

start();
