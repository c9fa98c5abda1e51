// The agent console: log in, watch visitors, show them the terms, join their sessions.
import { AgentClient } from "/js/herald.js";
import { byId, demoCredential, demoGroup, fragment, logLine, say } from "/static/pages.js";

const REASONS = { ended: "the visitor ended it", visitor_offline: "the visitor went offline", replaced: "replaced by a new one" };
const TERMS_TEXT = { displayed: "displayed", accepted: "accepted", declined: "declined" };

/** @type {AgentClient | null} */
let client = null;
/** visitor ID -> {element, online, terms, session} */
const cards = new Map();
/** session ID -> element */
const sessionCards = new Map();
const log = (text) => logLine(byId("log"), text);

function setConnection(state, text) {
  byId("connection").dataset.state = state;
  byId("connection-text").textContent = text;
}

function field(element, name) {
  return element.querySelector(`[data-field="${name}"]`);
}

/** The card of a visitor, made on first sight. */
function card(visitor) {
  let entry = cards.get(visitor);
  if (entry) return entry;
  const element = byId("visitor-card").content.firstElementChild.cloneNode(true);
  element.dataset.visitor = visitor;
  field(element, "id").textContent = visitor;
  for (const button of element.querySelectorAll("button")) button.setAttribute("aria-describedby", `v-${visitor}`);
  field(element, "id").id = `v-${visitor}`;
  element.querySelector('[data-action="terms"]').addEventListener("click", () => showTerms(visitor));
  element.querySelector('[data-action="join"]').addEventListener("click", () => joinByKey(visitor));
  byId("visitors").append(element);
  byId("no-visitors").hidden = true;
  entry = { element, online: null, session: null };
  cards.set(visitor, entry);
  return entry;
}

/** Show a visitor's presence: online, and its focused tab's page and visibility. */
function renderVisitor(state) {
  const entry = card(state.visitor);
  const { element } = entry;
  const connection = state.connections.find((c) => c.focused) || state.connections[0];
  element.dataset.online = String(state.online);
  field(element, "online").textContent = state.online ? "Online" : "Offline";
  field(element, "title").textContent = connection?.data?.title || "—";
  field(element, "url").textContent = connection?.data?.url || "—";
  field(element, "visible").textContent = connection ? (connection.visible ? "Visible" : "Hidden") : "—";
  if (entry.online !== null && entry.online !== state.online) {
    say(null, `${state.visitor} is ${state.online ? "online" : "offline"}`);
    log(`${state.visitor} went ${state.online ? "online" : "offline"}`);
  }
  entry.online = state.online;
}

function setTerms(visitor, status, text) {
  const strong = field(card(visitor).element, "terms");
  strong.dataset.status = status;
  say(strong, text);
}

function setSession(visitor, text, { joinable = false } = {}) {
  const { element } = card(visitor);
  say(field(element, "session"), text);
  element.querySelector('[data-action="join"]').disabled = !joinable;
}

async function showTerms(visitor) {
  const button = card(visitor).element.querySelector('[data-action="terms"]');
  const strong = field(card(visitor).element, "terms");
  button.disabled = true;
  setTerms(visitor, "asking", "asking…");
  try {
    await client.waitSession(visitor); // told when the session starts after the visitor accepts
    const delivered = await client.showTerms(visitor);
    // In a cluster the visitor's answer can overtake the ack (they travel on
    // different channels): an answer already shown is newer than "sent".
    if (strong.dataset.status === "asking") {
      setTerms(visitor, "sent", `sent to ${delivered} tab${delivered === 1 ? "" : "s"}`);
    }
    log(`Asked ${visitor} to show the terms`);
  } catch (error) {
    setTerms(visitor, "failed", `not delivered (${error.code || error.message})`);
  } finally {
    button.disabled = false;
  }
}

async function joinByKey(visitor) {
  try {
    joined(await client.joinSession({ key: visitor }));
  } catch (error) {
    setSession(visitor, `could not join (${error.code || error.message})`);
  }
}

/** A session this agent is in: its card, and the visitor's card if watched. */
function joined(session) {
  const label = `${session.guests} agent${session.guests === 1 ? "" : "s"}`;
  if (cards.has(session.visitor)) setSession(session.visitor, `joined · ${label}`);
  let element = sessionCards.get(session.session);
  if (!element) {
    element = byId("session-card").content.firstElementChild.cloneNode(true);
    element.dataset.session = session.session;
    element.querySelector('[data-action="leave"]').addEventListener("click", () => leave(session.session));
    sessionCards.set(session.session, element);
    byId("sessions").prepend(element);
    byId("no-sessions").hidden = true;
  }
  field(element, "visitor").textContent = session.visitor;
  field(element, "key").textContent = session.key;
  field(element, "guests").textContent = String(session.guests);
  say(null, `Joined the session of ${session.visitor}`);
  log(`Joined the session of ${session.visitor} (key ${session.key})`);
}

function sessionOver(sessionId, text) {
  const element = sessionCards.get(sessionId);
  if (!element) return;
  element.dataset.online = "false";
  field(element, "state").textContent = text;
  element.querySelector('[data-action="leave"]').disabled = true;
}

async function leave(sessionId) {
  try {
    await client.leaveSession(sessionId);
    sessionOver(sessionId, "Left");
    log("Left a session");
  } catch (error) {
    log(`Could not leave: ${error.code || error.message}`);
  }
}

function onSessionEvent({ detail: event }) {
  if (event.event === "started") {
    if (cards.has(event.visitor)) setSession(event.visitor, "started · ready to join", { joinable: true });
    log(`${event.visitor} started a session`);
  } else if (event.event === "ended") {
    const why = REASONS[event.reason] || event.reason || "ended";
    if (cards.has(event.visitor)) setSession(event.visitor, `ended (${why})`);
    sessionOver(event.session, "Ended");
    say(null, `The session of ${event.visitor} ended`);
    log(`The session of ${event.visitor} ended: ${why}`);
  } else if (event.event === "error") {
    if (cards.has(event.visitor)) setSession(event.visitor, `failed to start (${event.reason})`);
  }
}

function onSessionLost({ detail }) {
  // It ended while this console was reconnecting (a server restart moved it).
  sessionOver(detail.session, "Ended");
  say(null, "A session ended while the console was reconnecting");
  log(`A session ended while reconnecting (${detail.code})`);
}

function onSignal({ detail: signal }) {
  if (signal.event === "terms" && TERMS_TEXT[signal.data?.status]) {
    setTerms(signal.visitor, signal.data.status, TERMS_TEXT[signal.data.status]);
    log(`${signal.visitor} ${signal.data.status} the terms`);
  } else {
    log(`${signal.visitor} sent ${signal.event}`);
  }
}

function wire(agentClient, agent, group) {
  agentClient.addEventListener("connected", () => {
    setConnection("connected", `${agent} · ${group}`);
    log("Connected");
  });
  agentClient.addEventListener("disconnected", ({ detail }) => {
    setConnection("idle", detail.reconnecting ? "Reconnecting…" : "Disconnected");
    log(`Disconnected (${detail.code})${detail.reconnecting ? "; reconnecting" : ""}`);
  });
  agentClient.addEventListener("stopped", ({ detail }) => {
    if (detail.failure) {
      setConnection("failed", "Logged out");
      byId("login-error").textContent = `Disconnected: ${detail.failure.message}`;
      showWorkspace(false);
    }
  });
  agentClient.addEventListener("visitors", () => agentClient.visitors.forEach(renderVisitor));
  agentClient.addEventListener("signal", onSignal);
  agentClient.addEventListener("session_event", onSessionEvent);
  agentClient.addEventListener("session_lost", onSessionLost);
  agentClient.addEventListener("error", ({ detail }) => log(`Server: ${detail.code}: ${detail.message}`));
}

function showWorkspace(shown) {
  byId("workspace").hidden = !shown;
  byId("login-panel").hidden = shown;
  byId("logout").hidden = !shown;
}

async function login(event) {
  event?.preventDefault();
  const group = byId("group").value.trim();
  const agent = byId("agent").value.trim();
  const typed = byId("key").value.trim();
  const error = byId("login-error");
  error.textContent = "";
  let key = typed;
  if (!typed) {
    if ((await demoGroup()) !== group) {
      error.textContent = "Enter your agent key.";
      return;
    }
    // Demo mode: a fresh key from Herald whenever the login must be renewed.
    key = async () => (await demoCredential("agent", agent)).token;
  }
  byId("login").disabled = true;
  setConnection("idle", "Logging in…");
  client?.close();
  client = new AgentClient(undefined, { group, agent, key });
  wire(client, agent, group);
  try {
    await client.connect();
    showWorkspace(true);
    byId("watch-ids").focus();
  } catch (failure) {
    setConnection("failed", "Not logged in");
    error.textContent = `Login failed: ${failure.message}`;
  } finally {
    byId("login").disabled = false;
  }
}

async function watch(event) {
  event.preventDefault();
  const ids = byId("watch-ids").value.split(",").map((id) => id.trim()).filter(Boolean);
  byId("watch-error").textContent = "";
  try {
    const snapshot = await client.subscribe(ids);
    snapshot.visitors.forEach((state) => card(state.visitor));
    client.visitors.forEach(renderVisitor);
    byId("watch-ids").value = "";
    log(`Watching ${ids.join(", ")}`);
  } catch (error) {
    byId("watch-error").textContent = `Could not watch: ${error.message}`;
  }
}

async function watchGroup() {
  try {
    await client.subscribeGroup();
    client.visitors.forEach(renderVisitor);
    log("Watching the whole group");
  } catch (error) {
    byId("watch-error").textContent = `Could not watch the group: ${error.message}`;
  }
}

async function joinByCode(event) {
  event.preventDefault();
  byId("code-error").textContent = "";
  try {
    joined(await client.joinSession({ code: byId("code").value.trim() }));
    byId("code").value = "";
  } catch (error) {
    byId("code-error").textContent =
      error.code === "session_not_found" ? "No live session has that code." : `Could not join: ${error.message}`;
  }
}

async function start() {
  byId("login-form").addEventListener("submit", login);
  byId("watch-form").addEventListener("submit", watch);
  byId("watch-group").addEventListener("click", watchGroup);
  byId("code-form").addEventListener("submit", joinByCode);
  byId("logout").addEventListener("click", async () => {
    await client?.logout();
    setConnection("idle", "Not logged in");
    showWorkspace(false);
  });
  const given = fragment();
  const demo = await demoGroup();
  byId("group").value = given.get("group") || demo || "";
  byId("agent").value = given.get("agent") || (demo ? "agent-1" : "");
  byId("key").value = given.get("key") || "";
  if (demo) {
    byId("login-hint").textContent =
      `Demo mode: leave the key empty and Herald mints one for the "${demo}" group (only on this machine).`;
  }
  document.body.dataset.ready = "true";
  if (given.get("key") || (demo && given.get("login") === "1")) await login();
}

start();
