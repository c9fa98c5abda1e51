// The agent console: log in, watch visitors in a dense sortable list, show them the terms,
// join their sessions and see their screen when they share it.
import { AgentClient, ScreenView } from "/js/herald.js";
import { byId, demoCredential, demoGroup, fragment, logLine, say } from "/static/pages.js";

const REASONS = {
  ended: "the visitor ended it", visitor_offline: "the visitor went offline", replaced: "replaced by a new one",
  terminated: "your company's back end ended it",
};
const TERMS_TEXT = { displayed: "displayed", accepted: "accepted", declined: "declined" };
/** Error codes, in words for people. */
const WORDS = {
  visitor_offline: "the visitor is offline",
  signal_expired: "the visitor did not come back in time",
  delivery_failed: "the visitor's server did not confirm in time",
  session_not_found: "no live session (it ended, or the code is wrong)",
  member_offline: "they are not connected right now",
  rate_limited: "too many tries: wait a moment",
  overloaded: "the server is busy: try again in a moment",
  limit_exceeded: "over a limit of this server",
  forbidden: "not allowed",
  unauthorized: "not logged in, or the key is wrong",
  token_expired: "the login expired: log in again",
  revoked: "your company's back end revoked this login",
  backend_unavailable: "the server cannot reach its database: try again",
  code_space_exhausted: "no free code: try again",
  disconnected: "the connection dropped before the answer",
  timeout: "no answer in time",
  invalid: "the server refused the request",
  internal: "the server failed",
};
/** Websocket close codes, in words. */
const CLOSES = {
  1000: "closed", 1001: "the server went away", 1006: "the connection dropped", 1009: "a message was too big",
  4000: "the server stopped answering", 4001: "the connection fell behind", 4002: "the server is restarting",
  4003: "too many messages", 4500: "the login is no longer valid", 4505: "the login was revoked",
};
/** What a share's end means, in words. */
const SHARE_ENDED = {
  stopped: "The visitor stopped sharing.", capture_ended: "The visitor stopped sharing.",
  agent: "You ended the screen sharing.", declined: "The visitor declined.",
  session_ended: "The session ended.", closed: "You left the session.", disconnected: "Disconnected.",
};
const TERMS_ORDER = { none: 0, asking: 1, sent: 2, displayed: 3, accepted: 4, declined: 5, failed: 6 };
const SESSION_ORDER = { none: 0, started: 1, joined: 2, ended: 3, failed: 4 };

/** @type {AgentClient | null} */
let client = null;
/**
 * visitor ID -> its row and what the console knows of it
 * @type {Map<string, {element: HTMLTableRowElement, state: any, online: boolean | null, since: number,
 *                     lastSeen: number, terms: string, session: string, joinable: boolean}>}
 */
const rows = new Map();
/** IDs this console watches by name (the group too when `watchingGroup`). */
const watchedIds = new Set();
let watchingGroup = false;
/** Visitors unwatched while the whole group is watched: left out of the list. */
const unwatched = new Set();
/** session ID -> {element, view, name, stats} */
const sessionCards = new Map();
let sortKey = "status";
let sortDir = 1;
let stale = false;
const log = (text) => logLine(byId("log"), text);

/** An error in words. */
function words(error) {
  return WORDS[error?.code] || error?.message || String(error);
}

function closeWords(code) {
  return CLOSES[code] || (code ? `closed (${code})` : "the connection dropped");
}

function setConnection(state, text) {
  byId("connection").dataset.state = state;
  byId("connection-text").textContent = text;
}

function field(element, name) {
  return element.querySelector(`[data-field="${name}"]`);
}

function clock(ms) {
  const date = new Date(ms);
  const today = date.toDateString() === new Date().toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

// --- the visitor list

/** The row of a visitor, made on first sight. */
function row(visitor) {
  let entry = rows.get(visitor);
  if (entry) return entry;
  const element = byId("visitor-row").content.firstElementChild.cloneNode(true);
  element.dataset.visitor = visitor;
  const id = field(element, "id");
  id.textContent = visitor;
  id.title = visitor;
  id.id = `v-${visitor}`;
  for (const button of element.querySelectorAll("button")) button.setAttribute("aria-describedby", id.id);
  element.querySelector('[data-action="terms"]').addEventListener("click", () => showTerms(visitor));
  element.querySelector('[data-action="join"]').addEventListener("click", () => joinByKey(visitor));
  element.querySelector('[data-action="unwatch"]').addEventListener("click", () => unwatch(visitor));
  byId("visitors").append(element);
  entry = { element, state: null, online: null, since: 0, lastSeen: 0, terms: "none", session: "none", joinable: false };
  rows.set(visitor, entry);
  listChanged();
  return entry;
}

function removeRow(visitor) {
  rows.get(visitor)?.element.remove();
  rows.delete(visitor);
  listChanged();
}

/** Show a visitor's presence: online, its tabs, and the focused tab's page and visibility. */
function renderVisitor(state) {
  if (unwatched.has(state.visitor)) return;
  const entry = row(state.visitor);
  const { element } = entry;
  const tabs = [...state.connections].sort((a, b) => a.since - b.since);
  const focusedAt = tabs.findIndex((c) => c.focused);
  const focused = tabs[focusedAt] || tabs[0];
  if (entry.online !== null && entry.online !== state.online) {
    say(null, `${state.visitor} is ${state.online ? "online" : "offline"}`);
    log(`${state.visitor} went ${state.online ? "online" : "offline"}`);
  }
  if (entry.online && !state.online) entry.lastSeen = Date.now();
  entry.online = state.online;
  entry.state = state;
  entry.since = tabs.length ? Math.min(...tabs.map((c) => c.since)) * 1000 : 0;
  element.dataset.online = String(state.online);
  field(element, "title").textContent = focused?.data?.title || "—";
  field(element, "url").textContent = focused?.data?.url || "";
  element.querySelector(".page").title = tabs.length
    ? tabs
        .map((c, i) => `#${i + 1} ${c.data?.title || "?"} ${c.data?.url || ""} (${c.visible ? "visible" : "hidden"}${c.focused ? ", focused" : ""})`)
        .join("\n")
    : "";
  field(element, "tabs").textContent = String(tabs.length);
  field(element, "focus").textContent = tabs.length > 1 ? ` · #${focusedAt + 1}` : tabs.length ? " ·" : "";
  field(element, "visible").textContent = focused ? (focused.visible ? "visible" : "hidden") : "";
  element.querySelector(".tabs").title = tabs.length
    ? `${tabs.length} tab${tabs.length === 1 ? "" : "s"}; tab #${focusedAt + 1} has focus and is ${focused.visible ? "visible" : "hidden"}`
    : "";
  renderStatus(entry);
  scheduleSort();
}

/** The status, times and buttons of a row, from what is known and whether presence is fresh. */
function renderStatus(entry) {
  const { element, online } = entry;
  const seen = field(element, "seen");
  const away = online && entry.state?.connections.length === 0; // between connections, in its grace period
  field(element, "online").textContent = stale ? "Reconnecting…" : away ? "Away" : online ? "Online" : "Offline";
  const at = stale ? 0 : online ? entry.since : entry.lastSeen;
  seen.textContent = at ? `${online ? "since" : "seen"} ${clock(at)}` : "";
  if (at) seen.dateTime = new Date(at).toISOString();
  else seen.removeAttribute("datetime");
  element.querySelector(".status").title = stale
    ? "This console is reconnecting: presence may be out of date"
    : at ? `${online ? "Online since" : "Last seen"} ${new Date(at).toLocaleString()}` : "";
  const terms = element.querySelector('[data-action="terms"]');
  terms.disabled = stale || !online || entry.terms === "asking";
  terms.title = !online ? "The visitor is offline" : stale ? "Reconnecting…" : "";
  const join = element.querySelector('[data-action="join"]');
  join.disabled = stale || !entry.joinable;
  // Emphasised once the visitor accepted and its session is there to join.
  join.classList.toggle("secondary", !(entry.joinable && entry.terms === "accepted"));
}

function setTerms(visitor, status, text) {
  const entry = row(visitor);
  entry.terms = status;
  const span = field(entry.element, "terms");
  span.dataset.status = status;
  say(span, text);
  renderStatus(entry);
  scheduleSort();
}

function setSession(visitor, status, text, { joinable = false } = {}) {
  const entry = rows.get(visitor);
  if (!entry) return;
  entry.session = status;
  entry.joinable = joinable;
  say(field(entry.element, "session"), text);
  renderStatus(entry);
  scheduleSort();
}

/** The list's stale look while this console's own connection is down. */
function setStale(value) {
  stale = value;
  byId("visitors-panel").dataset.stale = String(value);
  byId("stale-note").hidden = !value;
  for (const entry of rows.values()) renderStatus(entry);
}

function listChanged() {
  const count = rows.size;
  byId("no-visitors").hidden = count > 0;
  byId("visitors-table").hidden = count === 0;
  byId("clear").disabled = count === 0 && !watchingGroup && watchedIds.size === 0;
  const online = [...rows.values()].filter((e) => e.online).length;
  byId("visitor-count").textContent = count ? `${count} watched · ${online} online` : watchingGroup ? "whole group" : "";
}

const SORTS = {
  status: (e) => [e.online ? 0 : 1, e.online ? e.since || 0 : -(e.lastSeen || 0)],
  id: (e) => [e.element.dataset.visitor],
  page: (e) => [field(e.element, "title").textContent.toLowerCase(), field(e.element, "url").textContent],
  tabs: (e) => [e.state?.connections.length ?? 0],
  terms: (e) => [TERMS_ORDER[e.terms] ?? 9],
  session: (e) => [SESSION_ORDER[e.session] ?? 9],
};

function compare(a, b) {
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (a[i] < b[i]) return -1;
    if (a[i] > b[i]) return 1;
  }
  return 0;
}

let sortQueued = false;
function scheduleSort() {
  if (sortQueued) return;
  sortQueued = true;
  requestAnimationFrame(() => {
    sortQueued = false;
    sortRows();
  });
}

function sortRows() {
  const key = SORTS[sortKey];
  const entries = [...rows.values()].sort(
    (a, b) => sortDir * compare(key(a), key(b)) || compare(SORTS.id(a), SORTS.id(b)),
  );
  const body = byId("visitors");
  const current = [...body.children];
  if (entries.every((e, i) => current[i] === e.element)) return listChanged();
  body.append(...entries.map((e) => e.element));
  listChanged();
}

function sortBy(key) {
  sortDir = sortKey === key ? -sortDir : 1;
  sortKey = key;
  for (const button of document.querySelectorAll("[data-sort]")) {
    const th = button.closest("th");
    th.setAttribute("aria-sort", button.dataset.sort !== key ? "none" : sortDir > 0 ? "ascending" : "descending");
  }
  sortRows();
}

async function unwatch(visitor) {
  if (watchingGroup) unwatched.add(visitor);
  watchedIds.delete(visitor);
  removeRow(visitor);
  try {
    await client.unsubscribe([visitor]);
    log(`Stopped watching ${visitor}`);
  } catch (error) {
    log(`Could not stop watching ${visitor}: ${words(error)}`);
  }
}

async function clearList() {
  const ids = [...watchedIds];
  const group = watchingGroup;
  watchedIds.clear();
  unwatched.clear();
  watchingGroup = false;
  for (const visitor of [...rows.keys()]) removeRow(visitor);
  try {
    for (let start = 0; start < ids.length || (start === 0 && group); start += 1000) {
      await client.unsubscribe(ids.slice(start, start + 1000), group && start === 0);
    }
    log("Cleared the list");
  } catch (error) {
    log(`Could not clear the list: ${words(error)}`);
  }
  listChanged();
}

// --- terms and sessions

async function showTerms(visitor) {
  setTerms(visitor, "asking", "asking…");
  try {
    await client.waitSession(visitor); // told when the session starts after the visitor accepts
    const delivered = await client.showTerms(visitor);
    // In a cluster the visitor's answer can overtake the ack (they travel on
    // different channels): an answer already shown is newer than "sent".
    if (row(visitor).terms === "asking") {
      setTerms(visitor, "sent", `sent to ${delivered} tab${delivered === 1 ? "" : "s"}`);
    }
    log(`Asked ${visitor} to show the terms`);
  } catch (error) {
    setTerms(visitor, "failed", `not shown: ${words(error)}`);
    log(`Could not show ${visitor} the terms: ${words(error)}`);
  }
}

async function joinByKey(visitor) {
  try {
    joined(await client.joinSession({ key: visitor }));
  } catch (error) {
    setSession(visitor, "failed", `could not join: ${words(error)}`);
  }
}

/** A readable name for a session: the visitor's ID, or for a page with only a code, that code. */
function sessionName(session) {
  return session.visitor.startsWith("consumer.") ? `Caller with code ${session.key}` : session.visitor;
}

/** A session this agent is in: its card with the visitor's screen, and the visitor's row if watched. */
function joined(session) {
  const label = `${session.guests} agent${session.guests === 1 ? "" : "s"}`;
  setSession(session.visitor, "joined", `joined · ${label}`);
  let card = sessionCards.get(session.session);
  if (!card) card = sessionCard(session);
  const { element } = card;
  field(element, "visitor").textContent = card.name;
  field(element, "key").textContent = session.key;
  field(element, "guests").textContent = String(session.guests);
  say(null, `Joined the session of ${card.name}`);
  log(`Joined the session of ${card.name} (key ${session.key})`);
}

function sessionCard(session) {
  const element = byId("session-card").content.firstElementChild.cloneNode(true);
  element.dataset.session = session.session;
  element.dataset.visitor = session.visitor;
  const name = sessionName(session);
  const view = new ScreenView(client, session);
  const card = { element, view, name, stats: null };
  const video = field(element, "video");
  const screen = field(element, "screen");
  const button = (action) => element.querySelector(`[data-action="${action}"]`);
  view.addEventListener("stream", ({ detail }) => {
    video.srcObject = detail.stream;
    video.hidden = false;
    element.dataset.sharing = "true";
    button("end-share").hidden = false;
    button("fullscreen").hidden = !document.fullscreenEnabled;
    screen.textContent = "Connecting to the visitor's screen…";
    clearInterval(card.stats);
    card.stats = setInterval(() => showStats(card), 1000);
    say(null, `${name} is sharing their screen`);
    log(`${name} shares their screen`);
  });
  view.addEventListener("negotiated", ({ detail }) => {
    if (detail.restart) log(`Renegotiated the screen of ${name} after a reconnect`);
  });
  view.addEventListener("ended", ({ detail }) => {
    clearInterval(card.stats);
    video.srcObject = null;
    video.hidden = true;
    delete video.dataset.frames;
    element.dataset.sharing = "false";
    button("end-share").hidden = true;
    button("fullscreen").hidden = true;
    const text = SHARE_ENDED[detail.reason] || "Screen sharing ended.";
    say(screen, text);
    log(`Screen sharing with ${name} ended: ${text}`);
  });
  button("end-share").addEventListener("click", () => view.endSharing());
  button("fullscreen").addEventListener("click", () => video.requestFullscreen().catch(() => {}));
  button("leave").addEventListener("click", () => leave(session.session));
  button("dismiss").addEventListener("click", () => dismiss(session.session));
  sessionCards.set(session.session, card);
  byId("sessions").prepend(element);
  byId("no-sessions").hidden = true;
  view.start();
  return card;
}

/** The picture's size and rate from getStats(), and its decoded frames (data-frames) for whoever checks. */
async function showStats(card) {
  const stats = await card.view.videoStats().catch(() => null);
  if (!stats || !card.view.stream) return;
  const video = field(card.element, "video");
  video.dataset.frames = String(stats.framesDecoded || 0);
  const size = stats.frameWidth ? `${stats.frameWidth}×${stats.frameHeight}` : "no picture yet";
  const rate = stats.framesPerSecond ? ` · ${Math.round(stats.framesPerSecond)} fps` : "";
  field(card.element, "screen").textContent = `Visitor's screen: ${size}${rate}`;
}

function sessionOver(sessionId, text) {
  const card = sessionCards.get(sessionId);
  if (!card) return;
  const { element } = card;
  element.dataset.online = "false";
  field(element, "state").textContent = text;
  element.querySelector('[data-action="leave"]').hidden = true;
  element.querySelector('[data-action="dismiss"]').hidden = false;
  card.view.close("session_ended"); // every received track stopped
  if (field(element, "video").hidden) {
    field(element, "screen").textContent = text === "Left" ? "You left the session." : "The session ended.";
  }
}

function dismiss(sessionId) {
  const card = sessionCards.get(sessionId);
  if (!card) return;
  card.view.close("closed");
  card.element.remove();
  sessionCards.delete(sessionId);
  byId("no-sessions").hidden = sessionCards.size > 0;
}

async function leave(sessionId) {
  const card = sessionCards.get(sessionId);
  try {
    await card?.view.close("closed"); // the visitor drops this viewer first
    await client.leaveSession(sessionId);
    sessionOver(sessionId, "Left");
    if (card) setSession(card.element.dataset.visitor, "none", "left");
    log("Left a session");
  } catch (error) {
    log(`Could not leave: ${words(error)}`);
  }
}

function onSessionEvent({ detail: event }) {
  if (event.event === "started") {
    setSession(event.visitor, "started", "ready to join", { joinable: true });
    log(`${event.visitor} started a session`);
  } else if (event.event === "ended") {
    const why = REASONS[event.reason] || event.reason || "ended";
    setSession(event.visitor, "ended", `ended: ${why}`);
    sessionOver(event.session, "Ended");
    say(null, `The session of ${event.visitor} ended`);
    log(`The session of ${event.visitor} ended: ${why}`);
  } else if (event.event === "error") {
    setSession(event.visitor, "failed", `failed to start: ${words({ code: event.reason })}`);
  }
}

function onSessionLost({ detail }) {
  // It ended while this console was reconnecting (a server restart moved it).
  sessionOver(detail.session, "Ended");
  say(null, "A session ended while the console was reconnecting");
  log(`A session ended while reconnecting: ${words(detail)}`);
}

function onSignal({ detail: signal }) {
  if (signal.event === "terms" && TERMS_TEXT[signal.data?.status]) {
    setTerms(signal.visitor, signal.data.status, TERMS_TEXT[signal.data.status]);
    log(`${signal.visitor} ${signal.data.status} the terms`);
  } else {
    log(`${signal.visitor} sent ${signal.event}`);
  }
}

// --- the connection

function wire(agentClient, agent, group) {
  agentClient.addEventListener("connected", () => {
    setConnection("connected", `${agent} · ${group}`);
    setStale(false);
    agentClient.visitors.forEach(renderVisitor);
    log("Connected");
  });
  agentClient.addEventListener("disconnected", ({ detail }) => {
    setConnection("idle", detail.reconnecting ? "Reconnecting…" : "Disconnected");
    setStale(true);
    log(`Disconnected: ${closeWords(detail.code)}${detail.reconnecting ? "; reconnecting" : ""}`);
  });
  agentClient.addEventListener("stopped", ({ detail }) => {
    if (detail.failure) {
      setConnection("failed", "Logged out");
      byId("login-error").textContent = `Disconnected: ${words(detail.failure)}`;
      showWorkspace(false);
    }
  });
  agentClient.addEventListener("visitors", () => {
    if (!stale) agentClient.visitors.forEach(renderVisitor);
  });
  agentClient.addEventListener("signal", onSignal);
  agentClient.addEventListener("session_event", onSessionEvent);
  agentClient.addEventListener("session_lost", onSessionLost);
  agentClient.addEventListener("error", ({ detail }) => log(`The server said: ${words(detail)}`));
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
    error.textContent = `Login failed: ${words(failure)}`;
  } finally {
    byId("login").disabled = false;
  }
}

async function watch(event) {
  event.preventDefault();
  const ids = byId("watch-ids").value.split(",").map((id) => id.trim()).filter(Boolean);
  byId("watch-error").textContent = "";
  try {
    ids.forEach((id) => unwatched.delete(id));
    const snapshot = await client.subscribe(ids);
    ids.forEach((id) => watchedIds.add(id));
    snapshot.visitors.forEach((state) => row(state.visitor));
    client.visitors.forEach(renderVisitor);
    byId("watch-ids").value = "";
    log(`Watching ${ids.join(", ")}`);
  } catch (error) {
    byId("watch-error").textContent = `Could not watch: ${words(error)}`;
  }
}

async function watchGroup() {
  byId("watch-error").textContent = "";
  try {
    await client.subscribeGroup();
    watchingGroup = true;
    client.visitors.forEach(renderVisitor);
    listChanged();
    log("Watching the whole group");
  } catch (error) {
    byId("watch-error").textContent = `Could not watch the group: ${words(error)}`;
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
      error.code === "session_not_found" ? "No live session has that code." : `Could not join: ${words(error)}`;
  }
}

async function start() {
  byId("login-form").addEventListener("submit", login);
  byId("watch-form").addEventListener("submit", watch);
  byId("watch-group").addEventListener("click", watchGroup);
  byId("clear").addEventListener("click", clearList);
  byId("code-form").addEventListener("submit", joinByCode);
  for (const button of document.querySelectorAll("[data-sort]")) {
    button.addEventListener("click", () => sortBy(button.dataset.sort));
  }
  byId("logout").addEventListener("click", async () => {
    for (const card of sessionCards.values()) card.view.close("closed");
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
