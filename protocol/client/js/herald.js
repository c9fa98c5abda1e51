// Herald's browser client: the visitor and agent SDKs as one ES module.
//
// It mirrors the Python SDK (protocol/client/: base.py, visitor.py, agent.py) and
// speaks the wire protocol of protocol/PROTOCOL.md: binary msgpack frames,
// hello/welcome, request ids matched to replies, presence, signals and
// support sessions. A page keeps one client per role; the client rides out
// network blips and server drains by itself (full-jitter backoff, an
// app-level ping because browsers cannot see websocket pings) and replays
// what lives on the connection (presence, subscriptions, session waits).
//
// Events are DOM events: `client.addEventListener("signal", (e) => e.detail)`.
// Server frames that answer no request arrive under their `type`
// ("presence_changed", "signal", "session_event", "guest_count", "focus",
// "session_connected", "session_signal", "error"); the client adds "connected",
// "disconnected" and "stopped" (and, for visitors, "session_ended").
//
// ScreenShare (the visitor) and ScreenView (an agent) carry a WebRTC screen share
// over session signals: the picture goes peer to peer, Herald relays the offer,
// the answer and the ICE candidates, and renegotiates after either side reconnects.

import { decode, encode } from "./vendor/msgpack.mjs";

/** Protocol versions this client speaks. */
export const VERSIONS = [1];
/** What a visitor reports about the co-browse terms dialog. */
export const TERMS_STATUSES = ["displayed", "accepted", "declined"];
/** Request id of a request that lost its socket before the reply came. */
export const DISCONNECTED = "disconnected";
/** How many signal ids (`sid`) a client remembers, to drop a signal it was sent again. */
export const SIGNAL_MEMORY = 256;
/** How many times an agent's signal is sent again, same sid, after delivery_failed or a lost socket. */
export const SIGNAL_RETRIES = 2;
/** Largest session signal payload, in UTF-8 bytes: a WebRTC offer or answer (SDP) in one message. */
export const MAX_PAYLOAD_BYTES = 64 * 1024;

const REPLY_TYPES = new Set(["ack", "snapshot", "visitor", "session_connected", "session_joined", "error"]);
const CLOSE_NAMES = {
  4500: "unauthorized", 4501: "forbidden", 4502: "unsupported_version", 4503: "handshake_failed", 4504: "session_ended",
  4505: "revoked",
};
// The visitor did not get the signal (or it is not known whether it did), and a repeat
// under its sid is shown once: worth one more try. Other errors are final.
const RETRIED = new Set(["delivery_failed", DISCONNECTED]);
const IDENTIFIER = /^[A-Za-z0-9._:@+-]{1,128}$/;

/**
 * @typedef {Record<string, string|number|boolean|null>} FlatMap
 * @typedef {{connection: string, data: FlatMap, visible: boolean, focused: boolean, since: number}} ConnectionState
 * @typedef {{visitor: string, online: boolean, version: number, connections: ConnectionState[]}} VisitorState
 * @typedef {{type: "welcome", protocol: number, connection: string, role: string, group: string,
 *            keepalive: number, visitor?: string, agent?: string, focused?: boolean, server?: string, expires?: number}} Welcome
 * @typedef {{type: "session_connected", session: string, key: string, key_type: string, show_key: boolean,
 *            guests: number, id?: number, ice_servers?: IceServer[]}} SessionConnected
 * @typedef {{type: "session_joined", id: number, session: string, key: string, visitor: string, guests: number,
 *            ice_servers?: IceServer[]}} SessionJoined
 * @typedef {{urls: string[], username?: string, credential?: string}} IceServer
 *   an RTCIceServer: a TURN server's username and credential are short-lived, made for this member
 * @typedef {{type: "session_signal", session: string, event: string, payload?: string, data?: FlatMap,
 *            connection: string, agent?: string, visitor?: string, sid?: string}} SessionSignal
 *   `connection` is the sender's: the `to` of an answer
 * @typedef {{type: "session_event", event: "started"|"ended"|"error", session: string, key?: string,
 *            visitor: string, key_type?: string, reason?: string}} SessionEvent
 *   `key` and `key_type` are absent only in the "ended" a visitor hears after a reconnect for the
 *   session its hello named (PROTOCOL.md §11.2)
 * @typedef {{connection: string, data?: FlatMap, visible?: boolean, since?: number}} ConnectionDelta
 * @typedef {{visitor: string, version: number, base: number, changed: ConnectionDelta[], removed: string[],
 *            focused: string | null}} VisitorDelta  what changed from version `base` (see applyDelta)
 * @typedef {{type: "snapshot", id: number, visitors: VisitorState[], group?: boolean}} Snapshot
 * @typedef {{type: string, [field: string]: any}} Frame
 * @typedef {string | (() => string | Promise<string>)} Credential
 *   A token or key; a function is called for a fresh one before every connect.
 *
 * The events (`addEventListener(name, (event) => event.detail)`), by name and detail:
 * @typedef {Object} HeraldEvents
 * @property {Welcome} connected  up (first time or again) with the role's state restored
 * @property {{code: number | null, reconnecting: boolean}} disconnected  the socket closed
 * @property {{failure: Error | null}} stopped  no more connections: closed, or refused (`failure`)
 * @property {{type: "signal", event: string, data: FlatMap, agent?: string, visitor?: string,
 *             connection?: string, sid?: string}} signal  a signal from an agent (to a visitor) or a visitor
 *   (to an agent); one whose `sid` the client has seen already (a sender's retry) is dropped, not emitted
 * @property {{type: "presence_changed", change: string, state?: VisitorState, delta?: VisitorDelta}} presence_changed
 *   agents: the whole state, or what changed (`visitors` holds the result either way)
 * @property {Map<string, VisitorState>} visitors  agents: `AgentClient.visitors` changed
 * @property {SessionEvent} session_event  agents: a session started, ended or failed
 * @property {{session: string, code: string}} session_lost  agents: a joined session could not be
 *   joined again after a reconnect (`code` "session_not_found": it ended meanwhile)
 * @property {SessionConnected} session_connected  visitors: a session is theirs (also unsolicited)
 * @property {{type: "guest_count", session: string, guests: number}} guest_count  visitors: agents in the session
 * @property {{type: "focus", focused: boolean}} focus  visitors: this tab gained or lost focus
 * @property {{session: string, reason: string}} session_ended  visitors: this client's session is over: it
 *   ended it ("ended"), started another ("replaced") or the group's back end ended it ("terminated"); or,
 *   told right after a reconnect, it ended while the client was away (the reason Herald recorded:
 *   "terminated", "replaced", "visitor_offline", "expired", …, else "ended")
 * @property {SessionSignal} session_signal  a member of a session this client is in sent it (a sid already
 *   seen is dropped, not emitted)
 * @property {{type: "error", code: string, message: string}} error  an error that answers no request
 */

/** An error the server answered with, or a refusal that stopped the client. */
export class HeraldError extends Error {
  /**
   * @param {string} code the protocol's error code (or "disconnected")
   * @param {string} message
   * @param {number} [closeCode] the websocket close code, when the refusal closed it
   */
  constructor(code, message, closeCode) {
    super(`${code}: ${message}`);
    this.name = "HeraldError";
    this.code = code;
    this.closeCode = closeCode;
  }
}

/** Whether to reconnect after a close with this code: 4500-4999 need a change first. */
export function shouldReconnect(code) {
  return code == null || !(code >= 4500 && code <= 4999);
}

/**
 * Full-jitter exponential backoff: attempt n waits uniform(0, min(cap, initial * factor^n)) s,
 * so clients dropped together do not all come back together.
 */
export class Backoff {
  /** @param {{initial?: number, factor?: number, cap?: number, random?: () => number}} [options] */
  constructor({ initial = 0.2, factor = 2, cap = 30, random = Math.random } = {}) {
    Object.assign(this, { initial, factor, cap, random });
  }

  /** @param {number} attempt from 0 @returns {number} seconds */
  delay(attempt) {
    return this.random() * Math.min(this.cap, this.initial * this.factor ** Math.min(attempt, 64));
  }
}

/** Frame bytes for a message; undefined fields are left out (nil means absent anyway). */
export function encodeFrame(message) {
  return encode(message, { ignoreUndefined: true });
}

/** A frame from bytes; anything but a map with a string "type" is refused. */
export function decodeFrame(bytes) {
  const frame = decode(bytes instanceof ArrayBuffer ? new Uint8Array(bytes) : bytes);
  if (frame === null || typeof frame !== "object" || Array.isArray(frame) || typeof frame.type !== "string") {
    throw new HeraldError("bad_frame", "a frame must be a map with a type");
  }
  return frame;
}

/**
 * A fresh signal id (`sid`, PROTOCOL.md §5.6): 16 hex characters from the CSPRNG, so two
 * logical signals never share one.
 * @returns {string}
 */
export function newSid() {
  return Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The sid a caller gave (checked: an identifier), or a fresh one. */
function signalId(sid) {
  if (sid == null) return newSid();
  if (typeof sid !== "string" || !IDENTIFIER.test(sid)) {
    throw new HeraldError("invalid", "sid: must be 1-128 characters of A-Z a-z 0-9 . _ : @ + -");
  }
  return sid;
}

/** Resolve a credential to its current value. */
async function resolveCredential(credential) {
  return typeof credential === "function" ? await credential() : credential;
}

/** The websocket URL of a Herald path, from an http(s) base URL. */
function websocketUrl(baseUrl, path) {
  const url = new URL(path, baseUrl);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

const sleep = (seconds, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, seconds * 1000);
    signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });

/**
 * One websocket kept alive, requests and events; base of the role clients.
 * `welcome`, `connected` and `failure` (why it stopped by itself) are read-only.
 * A received signal whose `sid` is among the last `signalMemory` sids this client got
 * (across reconnects) repeats one already emitted (a sender's retry): it is dropped and
 * counted in `duplicateSignals`. Signals without a sid are never dropped.
 */
export class HeraldClient extends EventTarget {
  static PATH = "";

  /**
   * @param {string} [baseUrl] Herald's http(s) URL; the page's own origin by default
   * @param {{reconnect?: boolean, backoff?: Backoff, requestTimeout?: number, connectTimeout?: number,
   *          signalMemory?: number}} [options]
   *   times in seconds; requestTimeout is long because a signal may be held for a reconnecting visitor;
   *   signalMemory: how many received sids are remembered (SIGNAL_MEMORY by default)
   */
  constructor(
    baseUrl,
    { reconnect = true, backoff = new Backoff(), requestTimeout = 30, connectTimeout = 10,
      signalMemory = SIGNAL_MEMORY } = {},
  ) {
    super();
    this.baseUrl = (baseUrl || globalThis.location?.origin || "").replace(/\/+$/, "");
    Object.assign(this, { reconnect, backoff, requestTimeout, connectTimeout });
    /** Received signals dropped as repeats of a sid already seen. */
    this.duplicateSignals = 0;
    this._signalMemory = Math.max(1, signalMemory);
    /** @type {Set<string>} insertion-ordered: the first is the oldest */
    this._seenSids = new Set();
    /** @type {Welcome | null} */
    this.welcome = null;
    this.connected = false;
    /** @type {Error | null} */
    this.failure = null;
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();
    this._running = null;
    this._stopped = false;
    this._stop = null;
    this._lastError = null;
    this._sessionQueue = Promise.resolve(); // session signals go one at a time, in call order
  }

  /** This connection's ID, from its welcome. */
  get connectionId() {
    return this.welcome?.connection ?? null;
  }

  /**
   * Start (if not running) and resolve with the Welcome once connected and restored.
   * Rejects with a HeraldError on a refusal, or on any failure when reconnect is off.
   * @returns {Promise<Welcome>}
   */
  connect() {
    if (!this._running) {
      this.failure = null;
      this._stopped = false;
      this._stop = new AbortController();
      this._running = this._run(this._stop.signal).finally(() => (this._running = null));
    }
    if (this.connected) return Promise.resolve(this.welcome);
    return new Promise((resolve, reject) => {
      const done = () => {
        this.removeEventListener("connected", onConnected);
        this.removeEventListener("stopped", onStopped);
      };
      const onConnected = (event) => (done(), resolve(event.detail));
      const onStopped = () => (done(), reject(this.failure || new HeraldError("closed", "the client was closed")));
      this.addEventListener("connected", onConnected);
      this.addEventListener("stopped", onStopped);
    });
  }

  /** Close cleanly (1000) and stop reconnecting; pending requests fail. */
  async close() {
    this._stop?.abort();
    this._ws?.close(1000);
    await this._running;
  }

  /**
   * Send `message` under a fresh id and resolve with the reply frame; rejects with
   * a HeraldError for an error reply, a lost socket ("disconnected") or a timeout.
   * Waits for a socket while one is being (re)established.
   * @param {Frame} message
   * @param {{timeout?: number}} [options] seconds; requestTimeout by default
   * @returns {Promise<Frame>}
   */
  async request(message, { timeout = this.requestTimeout } = {}) {
    const deadline = Date.now() + timeout * 1000;
    while (!this._ws || this._ws.readyState !== WebSocket.OPEN || !this.welcome) {
      if (this._halted()) throw new HeraldError(DISCONNECTED, "the client is not running; call connect()");
      await this._changed(deadline);
    }
    const id = this._nextId++;
    const ws = this._ws;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new HeraldError("timeout", `no reply to ${message.type} within ${timeout}s`));
      }, deadline - Date.now());
      this._pending.set(id, { resolve, reject, timer });
      ws.send(encodeFrame({ ...message, id }));
    });
  }

  /**
   * Send a session signal (PROTOCOL.md §11.9) to the other members of `session` (a visitor's own,
   * or one an agent joined), or to the one member `to` names (its connection ID, the `connection`
   * of a session signal it sent; "visitor": the session's visitor); resolves with how many members
   * got it. `payload` is a string of up to 64 KiB (an SDP offer or answer, an ICE candidate as JSON).
   *
   * Session signals go one at a time, each once the one before was acknowledged, so they reach
   * every member in the order of the calls. A socket lost before the ack ("disconnected"), or
   * "delivery_failed", sends it again under the same sid (receivers drop a sid they have seen)
   * once the connection is back and its session restored, up to `retries` times within
   * requestTimeout; other errors reject at once ("session_not_found": not a member;
   * "member_offline": `to` is not connected).
   * @param {string} session
   * @param {string} event
   * @param {string} [payload]
   * @param {{data?: FlatMap, to?: string, sid?: string, retries?: number}} [options]
   * @returns {Promise<number>}
   */
  sessionSignal(session, event, payload, options) {
    const { data, to, sid, retries = SIGNAL_RETRIES } = options ?? {};
    if (payload != null && (typeof payload !== "string" || new TextEncoder().encode(payload).length > MAX_PAYLOAD_BYTES)) {
      return Promise.reject(new HeraldError("invalid", `payload: must be a string of at most ${MAX_PAYLOAD_BYTES} bytes`));
    }
    let message;
    try {
      message = { type: "session_signal", session, event, payload, data, to, sid: signalId(sid) };
    } catch (error) {
      return Promise.reject(error);
    }
    const deadline = Date.now() + this.requestTimeout * 1000;
    const send = async () => {
      for (let attempt = 0; ; attempt++) {
        await this._untilConnected(deadline);
        try {
          const timeout = Math.max(0, deadline - Date.now()) / 1000;
          return (await this.request(message, { timeout })).delivered || 0;
        } catch (error) {
          if (!RETRIED.has(error.code) || attempt >= retries || Date.now() >= deadline || this._halted()) throw error;
          console.info(`herald: session signal ${event} got ${error.code}; sent again as sid ${message.sid}`);
        }
      }
    };
    const sent = this._sessionQueue.then(send, send);
    this._sessionQueue = sent.catch(() => {});
    return sent;
  }

  /** Resolve once connected with the role's state restored (an agent's sessions joined again). */
  async _untilConnected(deadline) {
    while (!this.connected) {
      if (this._halted()) throw new HeraldError(DISCONNECTED, "the client is not running; call connect()");
      await this._nextOf(["connected", "stopped"], deadline);
    }
  }

  /** Send a frame that gets no reply; false when no socket is open to take it. */
  send(message) {
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN || !this.welcome) return false;
    this._ws.send(encodeFrame(message));
    return true;
  }

  // --- hooks for the role clients

  /** The hello frame; runs before every connect, so it may fetch fresh credentials. */
  async _hello() {
    throw new Error("not implemented");
  }

  /** Before every websocket: an agent logs in here. */
  async _prepare() {}

  /** A websocket that closed before its welcome (the agent's login may be stale). */
  _onHandshakeFailed() {}

  /** Sees every server frame (welcome too) in wire order, before routing. */
  _onFrame(frame) {}

  /** Restores role state on a new connection; "connected" follows. */
  async _onWelcome(welcome) {}

  // --- machinery

  /** Stopped, stopping (close() was called) or never started: no socket will come. */
  _halted() {
    return !this._running || this._stopped || Boolean(this._stop?.signal.aborted);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** Resolve at the next state change (a socket, a welcome, a stop) or at the deadline. */
  _changed(deadline) {
    return this._nextOf(["_socket", "stopped"], deadline);
  }

  /** Resolve at the next event of one of `types`; reject with "timeout" at the deadline. */
  _nextOf(types, deadline) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        reject(new HeraldError("timeout", "no connection in time"));
      }, Math.max(0, deadline - Date.now()));
      const wake = () => (cleanup(), resolve());
      const cleanup = () => {
        clearTimeout(timer);
        for (const type of types) this.removeEventListener(type, wake);
      };
      for (const type of types) this.addEventListener(type, wake);
    });
  }

  _failPending(why) {
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(new HeraldError(DISCONNECTED, why));
    }
    this._pending.clear();
  }

  async _run(stop) {
    let attempt = 0;
    let code = null;
    try {
      while (!stop.aborted) {
        if (attempt) await sleep(this.backoff.delay(attempt - 1), stop);
        if (stop.aborted) break;
        let outcome;
        try {
          await this._prepare();
          const hello = await this._hello();
          if (stop.aborted) break; // closed while logging in: open nothing
          outcome = await this._live(hello, stop);
        } catch (error) {
          if (error instanceof HeraldError || !this.reconnect) throw error;
          outcome = { welcomed: false, code: null, error };
        }
        code = outcome.code;
        if (outcome.welcomed) attempt = 0;
        if (stop.aborted) break;
        if (!shouldReconnect(code)) throw this._refusal(code);
        if (!this.reconnect) throw this._refusal(code, outcome.error);
        attempt += 1;
        if (outcome.welcomed) this._emit("disconnected", { code, reconnecting: true });
      }
    } catch (error) {
      this.failure = error instanceof Error ? error : new Error(String(error));
    } finally {
      this._stopped = true; // before failing what is pending: nothing may wait for a socket now
      this.connected = false;
      this._ws = null;
      this._failPending("the client stopped");
      if (this.welcome) this._emit("disconnected", { code, reconnecting: false });
      this._emit("stopped", { failure: this.failure });
    }
  }

  _refusal(code, error) {
    const last = this._lastError;
    if (last) return new HeraldError(last.code, last.message, code ?? undefined);
    if (error) return error instanceof Error ? error : new Error(String(error));
    return new HeraldError(CLOSE_NAMES[code] || "closed", `closed with ${code}`, code ?? undefined);
  }

  /**
   * One connection from open to close. Resolves with {welcomed, code}: whether it got
   * a welcome and its close code (1006 when it died without one).
   */
  _live(hello, stop) {
    return new Promise((resolve) => {
      const ws = new WebSocket(websocketUrl(this.baseUrl, this.constructor.PATH));
      ws.binaryType = "arraybuffer";
      this._lastError = null;
      let welcomed = false;
      let lastFrame = Date.now();
      let keepalive = null;
      const connectTimer = setTimeout(() => ws.close(), this.connectTimeout * 1000);
      const onAbort = () => ws.close(1000);
      stop.addEventListener("abort", onAbort, { once: true });

      ws.onopen = () => ws.send(encodeFrame(hello));
      ws.onmessage = (message) => {
        lastFrame = Date.now();
        if (!(message.data instanceof ArrayBuffer)) return; // the protocol is binary
        let frame;
        try {
          frame = decodeFrame(message.data);
        } catch (error) {
          console.warn("herald: dropped a frame", error);
          return;
        }
        if (frame.type === "welcome" && !welcomed) {
          welcomed = true;
          clearTimeout(connectTimer);
          keepalive = this._keepalive(ws, frame.keepalive, () => lastFrame);
          this._keepFresh(ws, frame.expires);
          this._ws = ws;
          this.welcome = frame;
          this._onFrame(frame);
          this._emit("_socket");
          this._ready(ws, frame);
          return;
        }
        this._route(ws, frame);
      };
      ws.onclose = (event) => {
        clearTimeout(connectTimer);
        clearInterval(keepalive);
        stop.removeEventListener("abort", onAbort);
        if (this._ws === ws) this._ws = null;
        this.connected = false;
        this._failPending("connection lost");
        if (!welcomed && !stop.aborted) this._onHandshakeFailed();
        resolve({ welcomed, code: event.code || 1006 });
      };
    });
  }

  /** The credential factory for `refresh` (a function), or null: a fixed token cannot be refreshed. */
  _freshCredential() {
    return null;
  }

  /**
   * Before this connection's credential runs out (`welcome.expires`, unix s), send a
   * fresh one from the credential function (`refresh`, PROTOCOL.md §3.4): a group that
   * enforces expiry closes a connection whose credential ran out. Sent when about a
   * tenth of its life (5 to 60 s) is left; a failed refresh is tried again until then.
   */
  _keepFresh(ws, expires) {
    const factory = this._freshCredential();
    if (typeof expires !== "number" || typeof factory !== "function") return;
    const left = expires - Date.now() / 1000;
    const margin = Math.min(60, Math.max(5, left / 10));
    setTimeout(async () => {
      if (this._ws !== ws || ws.readyState !== WebSocket.OPEN) return; // a new connection has its own
      try {
        const answer = await this.request({ type: "refresh", token: await resolveCredential(factory) }, { timeout: 10 });
        this._keepFresh(ws, typeof answer.expires === "number" ? answer.expires : expires);
      } catch (error) {
        console.warn("herald: refreshing the credential failed", error);
        if (Date.now() / 1000 < expires) setTimeout(() => this._keepFresh(ws, expires), 2000);
      }
    }, Math.max(0, left - margin) * 1000);
  }

  /** Ping every `keepalive` s; close (and so reconnect) after 2.5x that of silence. */
  _keepalive(ws, keepalive, lastFrame) {
    if (!(keepalive > 0)) return null;
    const ping = encodeFrame({ type: "ping" });
    const tick = Math.min(keepalive / 4, 5) * 1000; // fine enough that pings keep their period
    let nextPing = Date.now() + keepalive * 1000;
    return setInterval(() => {
      const now = Date.now();
      if (now - lastFrame() > 2.5 * keepalive * 1000) {
        console.warn("herald: server silent; reconnecting");
        ws.close(4000, "server silent");
      } else if (now >= nextPing && ws.readyState === WebSocket.OPEN) {
        ws.send(ping);
        nextPing = now + keepalive * 1000;
      }
    }, tick);
  }

  async _ready(ws, welcome) {
    try {
      await this._onWelcome(welcome);
    } catch (error) {
      if (ws.readyState !== WebSocket.OPEN) return; // dropped mid-restore: the next connection restores again
      console.warn("herald: restoring state after connect failed", error);
    }
    if (this._ws !== ws) return;
    this.connected = true;
    this._emit("connected", welcome);
  }

  /** Remember a received sid; false if it was remembered already (the oldest is forgotten first). */
  _firstSid(sid) {
    if (this._seenSids.has(sid)) return false;
    this._seenSids.add(sid);
    if (this._seenSids.size > this._signalMemory) this._seenSids.delete(this._seenSids.values().next().value);
    return true;
  }

  _route(ws, frame) {
    const signal = frame.type === "signal" || frame.type === "session_signal";
    if (signal && typeof frame.sid === "string" && !this._firstSid(frame.sid)) {
      this.duplicateSignals += 1; // a retry of a signal already emitted: acted on once
      return;
    }
    try {
      this._onFrame(frame);
    } catch (error) {
      console.warn("herald: a frame hook failed", error);
    }
    if (frame.type === "ping") {
      ws.send(encodeFrame({ type: "pong" }));
    } else if (REPLY_TYPES.has(frame.type) && frame.id != null) {
      const pending = this._pending.get(frame.id);
      if (!pending) return;
      this._pending.delete(frame.id);
      clearTimeout(pending.timer);
      if (frame.type === "error") pending.reject(new HeraldError(frame.code, frame.message));
      else pending.resolve(frame);
    } else if (frame.type === "presence_changed" && !frame.state) {
      // a delta that missed a change: emitted once the visitor is looked up
    } else if (frame.type !== "pong") {
      if (frame.type === "error") this._lastError = frame;
      this._emit(frame.type, frame);
    }
  }
}

/**
 * A visitor: one tab's presence, reachable by agents. `data` (the merged presence data),
 * `visible`, `focused` and `session` (the live support session, guests kept current) are read-only.
 * An agent's signal whose sid this tab has seen already (an agent's retry) is dropped, so it is
 * acted on once (see HeraldClient).
 */
export class VisitorClient extends HeraldClient {
  static PATH = "/v1/visitor";

  /**
   * @param {string | undefined} baseUrl
   * @param {{group: string, visitor?: string, token?: Credential, sessionToken?: Credential,
   *          data?: FlatMap, visible?: boolean}} identity
   *   visitor and token, or (a consumer that redeemed a short code) only sessionToken
   * @param {object} [options] see HeraldClient
   */
  constructor(baseUrl, { group, visitor, token, sessionToken, data = {}, visible = true }, options) {
    super(baseUrl, options);
    const consumer = sessionToken != null;
    if (consumer ? visitor != null || token != null : visitor == null || token == null) {
      throw new TypeError("pass visitor and token, or (a consumer) only a sessionToken");
    }
    Object.assign(this, { group, visitor: visitor ?? null, consumer, visible });
    this._credential = consumer ? sessionToken : token;
    /** @type {FlatMap} */
    this.data = withoutNulls(data);
    this.focused = false;
    /** @type {SessionConnected | null} */
    this.session = null;
    this._sent = { data: {}, visible };
  }

  /** A consumer: a page that redeemed a short code over REST (see redeemShortCode). */
  static forSession(baseUrl, group, sessionToken, options) {
    return new VisitorClient(baseUrl, { group, sessionToken }, options);
  }

  /** Merge `data` into the presence data; a null value removes a field. Kept for reconnects. */
  setPresence(data) {
    this.data = withoutNulls({ ...this.data, ...data });
    this.send({ type: "presence", data });
  }

  /** Whether agents see this connection as visible (a hidden one still gets signals). */
  setVisible(visible) {
    this.visible = Boolean(visible);
    this.send({ type: "presence", visible: this.visible });
  }

  /**
   * Publish this page's address and title and follow its visibility, as agents expect to see them.
   * The address is the page's origin and path only: its query and fragment often hold what no agent
   * should see (credentials in a fragment, tokens and e-mail addresses in a query), so each is
   * published only when asked for.
   * @param {{query?: boolean, fragment?: boolean}} [options] add the query (`?…`) or fragment (`#…`)
   * @returns {() => void} stops following
   */
  trackPage({ query = false, fragment = false } = {}) {
    const url = location.origin + location.pathname + (query ? location.search : "") + (fragment ? location.hash : "");
    this.setPresence({ url, title: document.title });
    this.setVisible(document.visibilityState === "visible");
    const follow = () => this.setVisible(document.visibilityState === "visible");
    document.addEventListener("visibilitychange", follow);
    return () => document.removeEventListener("visibilitychange", follow);
  }

  /**
   * Signal the agents watching this visitor (or one `agent`); resolves on the server's ack.
   * @param {string} event
   * @param {FlatMap} [data]
   * @param {string} [agent] address this agent only
   * @param {{sid?: string}} [options] sid: names this one logical signal (an identifier; a fresh
   *   random one by default). Agents' clients drop a sid they have seen: to send it again after a
   *   lost socket ("disconnected"), pass the same sid (newSid() makes one).
   */
  async signalAgent(event, data, agent, options) {
    const { sid } = options ?? {};
    await this.request({ type: "signal", event, data, agent, sid: signalId(sid) });
  }

  /**
   * Report the co-browse terms dialog: "displayed", "accepted" or "declined".
   * @param {string} status
   * @param {{sid?: string}} [options] as in signalAgent
   */
  async terms(status, options) {
    if (!TERMS_STATUSES.includes(status)) throw new TypeError(`terms status must be one of ${TERMS_STATUSES}`);
    await this.signalAgent("terms", { status }, undefined, options);
  }

  /**
   * Start a support session (ending a previous one): "visitor" for one-click (agents join by
   * this visitor's ID), "random" for a short code to show (`show_key`).
   * @returns {Promise<SessionConnected>}
   */
  async startSession(keyType = "visitor") {
    if (keyType !== "visitor" && keyType !== "random") throw new TypeError('keyType is "visitor" or "random"');
    return /** @type {SessionConnected} */ (await this.request({ type: "start_session", key_type: keyType }));
  }

  /** End this visitor's session; the agents in it are told. */
  async endSession() {
    const ending = this.session?.session;
    await this.request({ type: "end_session" });
    if (this.session?.session === ending) this.session = null;
    if (ending) this._emit("session_ended", { session: ending, reason: "ended" });
  }

  async _hello() {
    const credential = await resolveCredential(this._credential);
    this._sent = { data: { ...this.data }, visible: this.visible };
    const data = Object.keys(this.data).length ? { ...this.data } : undefined;
    // The session this tab holds: if it ended while the tab was away, the server says so after the welcome.
    const session = this.session?.session;
    return this.consumer
      ? { type: "hello", versions: VERSIONS, group: this.group, session_token: credential, data, visible: this.visible }
      : { type: "hello", versions: VERSIONS, group: this.group, visitor: this.visitor, token: credential, data,
          visible: this.visible, session };
  }

  _onFrame(frame) {
    if (frame.type === "welcome" || frame.type === "focus") this.focused = Boolean(frame.focused);
    if (frame.type === "welcome" && this.consumer) this.visitor = frame.visitor;
    else if (frame.type === "session_connected") {
      const before = this.session?.session;
      this.session = frame;
      if (before && before !== frame.session) this._emit("session_ended", { session: before, reason: "replaced" });
    } else if (frame.type === "guest_count" && this.session?.session === frame.session) {
      this.session = { ...this.session, guests: frame.guests };
    } else if (frame.type === "session_event" && frame.event === "ended" && this.session?.session === frame.session) {
      // Its group's back end ended it ("terminated"), or it ended while this tab was away (after a reconnect).
      this.session = null;
      this._emit("session_ended", { session: frame.session, reason: frame.reason || "ended" });
    }
  }

  _freshCredential() {
    return this.consumer ? null : this._credential;
  }

  async _onWelcome() {
    // Changes made while the hello was in flight missed both it and the socket.
    const { data: sent, visible } = this._sent;
    const delta = {};
    for (const key of Object.keys(sent)) if (!(key in this.data)) delta[key] = null;
    for (const [key, value] of Object.entries(this.data)) if (sent[key] !== value) delta[key] = value;
    const changed = Object.keys(delta).length > 0;
    if (changed || visible !== this.visible) {
      this.send({ type: "presence", data: changed ? delta : undefined,
                  visible: visible === this.visible ? undefined : this.visible });
    }
  }
}

/**
 * The state `delta` leads to from `state`, or null when `state` is not the version it applies to
 * (a change was missed: look the visitor up). `state` is left as it was.
 * @param {VisitorState | undefined} state
 * @param {VisitorDelta} delta
 * @returns {VisitorState | null}
 */
export function applyDelta(state, delta) {
  if (!state || state.version !== delta.base) return null;
  const connections = new Map(state.connections.map((c) => [c.connection, c]));
  for (const gone of delta.removed) connections.delete(gone);
  for (const change of delta.changed) {
    const held = connections.get(change.connection);
    const data = { ...(held ? held.data : {}), ...(change.data ?? {}) };
    for (const [key, value] of Object.entries(data)) if (value === null) delete data[key];
    connections.set(change.connection, {
      connection: change.connection,
      data,
      visible: change.visible ?? (held ? held.visible : false),
      focused: false,
      since: change.since ?? (held ? held.since : 0),
    });
  }
  return {
    visitor: state.visitor,
    online: true,
    version: delta.version,
    connections: [...connections.values()].map((c) => ({ ...c, focused: c.connection === delta.focused })),
  };
}

/**
 * An agent: logs in over HTTP (an HttpOnly session cookie that the websocket upgrade carries),
 * watches visitors and signals them. `visitors` maps each watched visitor to its latest state
 * (the version rule applied); `waiting` holds session keys waited for and not yet started.
 * A "visitors" event follows every change of `visitors`. A visitor's signal whose sid was seen
 * already is dropped (see HeraldClient).
 */
export class AgentClient extends HeraldClient {
  static PATH = "/v1/agent";

  /**
   * @param {string | undefined} baseUrl
   * @param {{group: string, agent: string, key: Credential}} identity
   *   the login key; a function gets a fresh one whenever the login must be renewed
   * @param {object} [options] see HeraldClient
   */
  constructor(baseUrl, { group, agent, key }, options) {
    super(baseUrl, options);
    Object.assign(this, { group, agent });
    this._key = key;
    /** @type {Map<string, VisitorState>} */
    this.visitors = new Map();
    /** @type {Set<string>} */
    this.waiting = new Set();
    /** @type {Set<string>} sessions this agent is in, joined again after a reconnect */
    this.joined = new Set();
    /** @type {Map<string, IceServer[]>} each joined session's ICE servers, fresh from its latest (re)join */
    this.iceServers = new Map();
    this.loginExpires = null;
    this._loggedIn = false;
    this._watched = new Set();
    this._watchGroup = false;
    /** @type {Map<string, {change: string, version: number}>} deltas that missed a change, while looked up */
    this._missed = new Map();
  }

  _freshCredential() {
    return this._key;
  }

  /** POST /v1/agent/login: trade the key for the session cookie. Refusals throw HeraldError. */
  async login() {
    const key = await resolveCredential(this._key);
    const response = await fetch(`${this.baseUrl}/v1/agent/login`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ group: this.group, agent: this.agent, key }),
      credentials: "include",
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const { code = `http_${response.status}`, message = response.statusText } = body.error || {};
      if (response.status >= 400 && response.status < 500 && response.status !== 408 && response.status !== 429) {
        throw new HeraldError(code, message);
      }
      throw new Error(`login answered HTTP ${response.status}: ${code}: ${message}`);
    }
    this.loginExpires = body.expires ?? null;
    this._loggedIn = true;
    return body;
  }

  /** End the login on the server and close this client. */
  async logout() {
    this.reconnect = false;
    try {
      if (this._loggedIn) await fetch(`${this.baseUrl}/v1/agent/logout`, { method: "POST", credentials: "include" });
    } finally {
      this._loggedIn = false;
      await this.close();
    }
  }

  /** Watch these visitors (kept across reconnects). @returns {Promise<Snapshot>} */
  subscribe(visitors) {
    const added = visitors.filter((v) => !this._watched.has(v));
    added.forEach((v) => this._watched.add(v));
    return this._replayable({ type: "subscribe", visitors }, () => added.forEach((v) => this._watched.delete(v)));
  }

  /** Watch every visitor of the group (kept across reconnects). @returns {Promise<Snapshot>} */
  subscribeGroup() {
    const had = this._watchGroup;
    this._watchGroup = true;
    return this._replayable({ type: "subscribe", group: true }, () => (this._watchGroup = had));
  }

  /** Stop watching these visitors and/or the group; they leave `visitors`. */
  async unsubscribe(visitors = [], group = false) {
    visitors.forEach((v) => this._watched.delete(v));
    if (group) this._watchGroup = false;
    for (const visitor of [...this.visitors.keys()]) if (!this._watching(visitor)) this.visitors.delete(visitor);
    this._emit("visitors", this.visitors);
    await this.request({ type: "unsubscribe", visitors: visitors.length ? visitors : undefined,
                         group: group || undefined });
  }

  /** One visitor's state, without watching it. @returns {Promise<VisitorState>} */
  async lookup(visitor) {
    return (await this.request({ type: "lookup", visitor })).state;
  }

  /**
   * Send `event` to the visitor's focused connection (or to: "all"); resolves with how many
   * connections got it. A visitor that is reconnecting has it held; "signal_expired" if it never
   * comes back, "visitor_offline" if it is gone.
   *
   * The signal goes out under one `sid`; the visitor's client drops a sid it has already seen, so
   * the signal is acted on once however often it is sent. When the answer is "delivery_failed"
   * (the visitor's instance did not confirm in time: the visitor did not get it, short of a lost
   * confirmation) or the socket went away before the answer ("disconnected": it may have gone
   * out), it is sent again under the same sid, up to `retries` times within requestTimeout in
   * all; then the last error rejects ("timeout" if requestTimeout runs out first).
   * Every other error (visitor_offline, signal_expired, forbidden, limit_exceeded, ...) rejects
   * at once.
   * @param {string} visitor
   * @param {string} event
   * @param {FlatMap} [data]
   * @param {"focused" | "all"} [to]
   * @param {{sid?: string, retries?: number}} [options] sid: names this one logical signal (an
   *   identifier; a fresh random one by default; pass the same one to send it again yourself);
   *   retries: how many times to send it again (SIGNAL_RETRIES by default; 0: never)
   * @returns {Promise<number>}
   */
  async signal(visitor, event, data, to = "focused", options) {
    const { sid, retries = SIGNAL_RETRIES } = options ?? {};
    const message = { type: "signal", visitor, event, data, to, sid: signalId(sid) };
    const deadline = Date.now() + this.requestTimeout * 1000;
    for (let attempt = 0; ; attempt++) {
      try {
        const timeout = Math.max(0, deadline - Date.now()) / 1000;
        return (await this.request(message, { timeout })).delivered || 0;
      } catch (error) {
        if (!RETRIED.has(error.code) || attempt >= retries || Date.now() >= deadline || this._halted()) throw error;
        console.info(`herald: ${event} to ${visitor} got ${error.code}; sent again as sid ${message.sid}`);
      }
    }
  }

  /**
   * Ask the visitor's page to show the co-browse terms dialog: signal "showterms", shown once
   * even when it had to be sent again.
   * @param {string} visitor
   * @param {{sid?: string, retries?: number}} [options] as in signal
   * @returns {Promise<number>}
   */
  showTerms(visitor, options) {
    return this.signal(visitor, "showterms", undefined, "focused", options);
  }

  /** Be told (session_event "started") when a session keyed by this visitor ID starts; kept across reconnects. */
  async waitSession(key) {
    const added = !this.waiting.has(key);
    this.waiting.add(key);
    await this._replayable({ type: "wait_session", key }, () => added && this.waiting.delete(key));
  }

  /**
   * Join a session by exactly one of its visitor-ID `key`, the short `code` the visitor read
   * out, or its `session` ID. @returns {Promise<SessionJoined>}
   */
  async joinSession({ key, code, session }) {
    if ([key, code, session].filter((v) => v != null).length !== 1) {
      throw new TypeError("join a session by exactly one of key, code or session");
    }
    const joined = await this.request({ type: "join_session", key, code, session });
    this.waiting.delete(joined.key);
    this.joined.add(joined.session);
    return /** @type {SessionJoined} */ (joined);
  }

  /** Leave a session this agent joined; the visitor sees the count drop. */
  async leaveSession(session) {
    this.joined.delete(session);
    this.iceServers.delete(session);
    await this.request({ type: "leave_session", session });
  }

  _watching(visitor) {
    return this._watchGroup || this._watched.has(visitor);
  }

  /** A request whose effect is recorded for reconnects; a refusal (not a lost socket) undoes it. */
  async _replayable(message, undo) {
    try {
      return await this.request(message);
    } catch (error) {
      if (error.code !== DISCONNECTED) undo();
      throw error;
    }
  }

  /** Keep `state` unless it is for someone unwatched or not newer than ours. */
  _update(state) {
    const held = this.visitors.get(state?.visitor);
    if (!state || !this._watching(state.visitor) || (held && state.version <= held.version)) return false;
    this.visitors.set(state.visitor, state);
    return true;
  }

  /**
   * Apply what changed and return the new state. If a change was missed, null: the visitor is looked
   * up (once at a time, again if more was missed meanwhile) and the change emitted then.
   */
  _applyDelta(change, delta) {
    const held = this.visitors.get(delta.visitor);
    if (!this._watching(delta.visitor) || (held && held.version >= delta.version)) return null;
    const state = applyDelta(held, delta);
    if (state) {
      this.visitors.set(delta.visitor, state);
      return state;
    }
    const missed = this._missed.get(delta.visitor);
    this._missed.set(delta.visitor, { change, version: Math.max(missed?.version ?? 0, delta.version) });
    if (!missed) this._lookUpMissed(delta.visitor);
    return null;
  }

  async _lookUpMissed(visitor) {
    try {
      while (this._watching(visitor)) {
        await this.lookup(visitor); // its answer updates `visitors` as it is read
        const held = this.visitors.get(visitor);
        const missed = this._missed.get(visitor);
        if (held && held.version >= missed.version) {
          this._emit("presence_changed", { type: "presence_changed", change: missed.change, state: held });
          this._emit("visitors", this.visitors);
          break;
        }
      }
    } catch {
      // disconnected: the next snapshot brings it
    } finally {
      this._missed.delete(visitor);
    }
  }

  async _prepare() {
    if (!this._loggedIn) await this.login();
  }

  _onHandshakeFailed() {
    // A browser cannot see why an upgrade failed; a stale login is the likely cause.
    this._loggedIn = false;
  }

  async _hello() {
    return { type: "hello", versions: VERSIONS };
  }

  _onFrame(frame) {
    let changed = false;
    if (frame.type === "welcome") {
      changed = this.visitors.size > 0;
      this.visitors.clear(); // rebuilt from the snapshots _onWelcome asks for
    } else if (frame.type === "snapshot") {
      for (const state of frame.visitors) changed = this._update(state) || changed;
    } else if (frame.type === "presence_changed" && frame.delta) {
      frame.state = this._applyDelta(frame.change, frame.delta); // emitted with the state it leads to
      changed = frame.state !== null;
    } else if (frame.type === "presence_changed" || frame.type === "visitor") {
      changed = this._update(frame.state);
    } else if (frame.type === "session_event" && frame.event === "started") {
      this.waiting.delete(frame.key);
    } else if (frame.type === "session_event" && frame.event === "ended") {
      this.joined.delete(frame.session);
      this.iceServers.delete(frame.session);
    } else if (frame.type === "session_joined") {
      this.iceServers.set(frame.session, frame.ice_servers ?? []);
    }
    if (changed) queueMicrotask(() => this._emit("visitors", this.visitors));
  }

  async _onWelcome() {
    const watched = [...this._watched].sort();
    for (let start = 0; start < watched.length; start += 1000) {
      await this.request({ type: "subscribe", visitors: watched.slice(start, start + 1000) });
    }
    if (this._watchGroup) await this.request({ type: "subscribe", group: true });
    for (const key of [...this.waiting].sort()) {
      if (await this._refusedAgain({ type: "wait_session", key })) this.waiting.delete(key);
    }
    for (const session of [...this.joined].sort()) {
      const code = await this._refusedAgain({ type: "join_session", session });
      if (code) {
        this.joined.delete(session);
        this._emit("session_lost", { session, code });
      }
    }
  }

  /** Replay a request after a reconnect: the error code if it is refused now, else null. */
  async _refusedAgain(message) {
    try {
      await this.request(message);
      return null;
    } catch (error) {
      if (error.code === DISCONNECTED) throw error;
      return error.code;
    }
  }
}

/**
 * Short codes over REST, for a page with only JavaScript (PROTOCOL.md §12.1): create a code,
 * redeem it at once, and connect as the session's visitor with the token.
 * @returns {Promise<{code: string, session: string, sessionToken: string}>}
 */
export async function createShortCode(baseUrl, group) {
  const base = (baseUrl || location.origin).replace(/\/+$/, "");
  const groupPath = `${base}/v1/groups/${encodeURIComponent(group)}/codes`;
  const created = await restJson(await fetch(groupPath, { method: "POST" }));
  const redeemed = await restJson(await fetch(`${groupPath}/${encodeURIComponent(created.code)}`));
  return { code: created.code, session: redeemed.session, sessionToken: redeemed.session_token };
}

async function restJson(response) {
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const { code = `http_${response.status}`, message = response.statusText } = body.error || {};
    throw new HeraldError(code, message);
  }
  return body;
}

function withoutNulls(data) {
  return Object.fromEntries(Object.entries(data || {}).filter(([, value]) => value != null));
}

// --- Screen share over session signals (PROTOCOL.md §11.11)

/**
 * The session signal events of a screen share. The visitor shares and is always the one that
 * offers; an agent that views (a "viewer", named by a random ID that outlives its reconnects)
 * asks for an offer. Every signal but rtc.ready and the visitor's rtc.end carries `data.viewer`;
 * offers, answers and candidates carry `data.n`, the negotiation they belong to.
 */
export const RTC = Object.freeze({
  /** visitor → the session: sharing (started, or again after the visitor's reconnect); viewers ask */
  ready: "rtc.ready",
  /** agent → "visitor": send this viewer an offer (to view, or after the agent's reconnect) */
  request: "rtc.request",
  /** visitor → the viewer's connection: an SDP offer as `payload`; an ICE restart for a known viewer */
  offer: "rtc.offer",
  /** agent → "visitor": the SDP answer as `payload` */
  answer: "rtc.answer",
  /** both: one trickled ICE candidate, its JSON as `payload` */
  ice: "rtc.ice",
  /** visitor → the session: sharing stopped; agent → "visitor": this viewer left, or (`data.stop`) end the share */
  end: "rtc.end",
});

/** How often, and how far apart (s), a viewer asks again while the visitor is between connections. */
const REQUEST_TRIES = 8;
const REQUEST_PAUSE = 1;
/** Seconds an unanswered offer stands before the same viewer's repeated request gets a new one. */
const OFFER_FRESH = 10;
const DEAD = new Set(["failed", "closed"]);

/** Add `handlers` (event type → listener) to `target`; returns a function that removes them. */
function listen(target, handlers) {
  const entries = Object.entries(handlers);
  for (const [type, handler] of entries) target.addEventListener(type, handler);
  return () => entries.forEach(([type, handler]) => target.removeEventListener(type, handler));
}

function stopTracks(stream) {
  for (const track of stream?.getTracks() ?? []) track.stop();
}

function quiet(what) {
  return (error) => console.info(`herald: ${what}: ${error?.code || error?.message || error}`);
}

/**
 * The visitor's side of a screen share: shares a MediaStream (the page's own tab, a screen, or any
 * stream, e.g. a canvas's captureStream()) with the agents of the client's live session, one
 * RTCPeerConnection per viewer. Nothing is captured by this class: the page captures (capture(),
 * from the visitor's own click) and hands the stream to start(). Every track is stopped when the
 * share stops: stop(), the session ending (session_ended), the client stopping, the visitor ending
 * the capture in the browser's own UI, or an agent's "end sharing".
 *
 * Events: "sharing" {stream}; "viewers" {count} (peer connections up); "ended" {reason}:
 * "stopped" (stop()), "agent" (an agent ended it), "capture_ended", "session_ended", "disconnected".
 */
export class ScreenShare extends EventTarget {
  /**
   * Ask the browser for the screen: the page's own tab, offered first (`tab`), or any screen, window
   * or tab; video only. Call it from the click that consents (browsers require a user gesture).
   * @param {{tab?: boolean}} [options]
   * @returns {Promise<MediaStream>}
   */
  static capture({ tab = true } = {}) {
    const options = tab
      ? { video: { displaySurface: "browser" }, preferCurrentTab: true, selfBrowserSurface: "include",
          surfaceSwitching: "exclude", monitorTypeSurfaces: "exclude" }
      : { video: true };
    return navigator.mediaDevices.getDisplayMedia({ ...options, audio: false });
  }

  /**
   * @param {VisitorClient} client
   * @param {{rtcConfiguration?: RTCConfiguration}} [options] merged into each peer connection's; its
   *   iceServers are used only when the session has none of its own
   */
  constructor(client, { rtcConfiguration = {} } = {}) {
    super();
    this.client = client;
    this.rtcConfiguration = rtcConfiguration;
    /** @type {MediaStream | null} what is being shared */
    this.stream = null;
    /** @type {string | null} the session shared in */
    this.session = null;
    /** offers made, restarts included */
    this.negotiations = 0;
    /**
     * viewer -> its peer connection, the agent connection it answers from, the latest offer's
     * number and time, and whether the next request is answered with an ICE restart
     * @type {Map<string, {viewer: string, pc: RTCPeerConnection, connection: string, n: number,
     *                     chain: Promise<void>, restart: boolean, offered: number}>}
     */
    this._peers = new Map();
    this._captureEnded = () => this.stop("capture_ended");
    this._off = listen(client, {
      session_signal: ({ detail }) => this._onSignal(detail),
      session_connected: ({ detail }) => this._onSessionConnected(detail),
      session_ended: ({ detail }) => detail.session === this.session && this.stop("session_ended"),
      stopped: () => this.stop("disconnected"),
    });
  }

  /** Whether a stream is being shared. */
  get sharing() {
    return this.stream !== null;
  }

  /** Viewers whose peer connection is up. */
  get viewers() {
    return [...this._peers.values()].filter((peer) => peer.pc.connectionState === "connected").length;
  }

  /**
   * Share `stream` in the client's live session: the agents in it are told and ask for the picture.
   * Without a live session the stream's tracks are stopped and it rejects ("session_not_found").
   * @param {MediaStream} stream
   */
  async start(stream) {
    if (this.stream) throw new Error("already sharing: stop() first");
    const session = this.client.session?.session;
    if (!session) {
      stopTracks(stream);
      throw new HeraldError("session_not_found", "start a session before sharing");
    }
    this.session = session;
    this.stream = stream;
    for (const track of stream.getTracks()) track.addEventListener("ended", this._captureEnded);
    this._emit("sharing", { stream });
    await this.client.sessionSignal(session, RTC.ready).catch(quiet("announcing the share"));
  }

  /**
   * Stop sharing: every track stopped, every peer connection closed, the agents told.
   * @param {string} [reason]
   * @returns {boolean} whether anything was being shared
   */
  stop(reason = "stopped") {
    const stream = this.stream;
    if (!stream) return false;
    this.stream = null;
    for (const track of stream.getTracks()) track.removeEventListener("ended", this._captureEnded);
    stopTracks(stream);
    for (const peer of this._peers.values()) peer.pc.close();
    this._peers.clear();
    if (reason !== "session_ended" && reason !== "disconnected") {
      this.client.sessionSignal(this.session, RTC.end, undefined, { data: { reason } }).catch(quiet("ending the share"));
    }
    this._emit("ended", { reason });
    this._emit("viewers", { count: 0 });
    return true;
  }

  /** Stop sharing and stop listening to the client. */
  close() {
    this.stop();
    this._off();
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _iceServers() {
    return this.client.session?.ice_servers ?? this.rtcConfiguration.iceServers ?? [];
  }

  _onSessionConnected(session) {
    // Unsolicited: this visitor reconnected (its new connection is the session's now).
    if (!this.stream) return;
    if (session.session !== this.session) {
      this.stop("session_ended");
      return;
    }
    for (const peer of this._peers.values()) {
      peer.restart = true; // whatever it asks next is answered with an ICE restart from here
      try {
        const { pc } = peer;
        pc.setConfiguration({ ...this.rtcConfiguration, iceServers: this._iceServers() });
      } catch (error) {
        quiet("fresh ICE servers")(error);
      }
    }
    this.client.sessionSignal(this.session, RTC.ready).catch(quiet("announcing the share again"));
  }

  _onSignal(signal) {
    const viewer = signal.data?.viewer;
    if (!this.stream || signal.session !== this.session || typeof viewer !== "string") return;
    if (signal.event === RTC.request) {
      this._offer(viewer, signal.connection);
      return;
    }
    const peer = this._peers.get(viewer);
    if (!peer) return;
    if (signal.event === RTC.answer) {
      this._then(peer, async () => {
        if (signal.data.n !== peer.n || peer.pc.signalingState !== "have-local-offer") return; // a stale one
        await peer.pc.setRemoteDescription({ type: "answer", sdp: signal.payload });
      });
    } else if (signal.event === RTC.ice && signal.payload) {
      this._then(peer, async () => {
        if (signal.data.n === peer.n) await peer.pc.addIceCandidate(JSON.parse(signal.payload));
      });
    } else if (signal.event === RTC.end) {
      if (signal.data.stop) {
        this.stop("agent");
      } else {
        peer.pc.close();
        this._peers.delete(viewer);
        this._emit("viewers", { count: this.viewers });
      }
    }
  }

  /** Run `step` after the peer's earlier steps; a failure is logged, and the next step runs anyway. */
  _then(peer, step) {
    peer.chain = peer.chain.then(step).catch(quiet("screen share"));
  }

  /**
   * Offer to `viewer` at `connection`: a new peer connection, or an ICE restart of its live one
   * after either side reconnected. A repeated request (the viewer asked on joining and again on
   * rtc.ready) while the call is up or its offer fresh changes nothing.
   */
  _offer(viewer, connection) {
    let peer = this._peers.get(viewer);
    if (peer && DEAD.has(peer.pc.connectionState)) {
      peer.pc.close();
      this._peers.delete(viewer);
      peer = undefined;
    }
    const fresh = peer && (peer.pc.connectionState === "connected" || Date.now() - peer.offered < OFFER_FRESH * 1000);
    if (peer && !peer.restart && peer.connection === connection && fresh) return;
    const restart = Boolean(peer);
    if (!peer) peer = this._newPeer(viewer);
    peer.connection = connection;
    peer.restart = false;
    peer.offered = Date.now();
    this._then(peer, async () => {
      const { pc } = peer;
      if (pc.signalingState === "closed") return;
      if (pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" });
      const n = ++peer.n;
      await pc.setLocalDescription(await pc.createOffer({ iceRestart: restart }));
      this.negotiations += 1;
      this.client
        .sessionSignal(this.session, RTC.offer, pc.localDescription.sdp, { to: peer.connection, data: { viewer, n } })
        .catch((error) => {
          quiet("offer")(error);
          if (error.code === "member_offline" && this._peers.get(viewer) === peer && peer.n === n) {
            pc.close(); // that agent is gone or moved: it asks again from its new connection
            this._peers.delete(viewer);
          }
        });
    });
  }

  _newPeer(viewer) {
    const pc = new RTCPeerConnection({ ...this.rtcConfiguration, iceServers: this._iceServers() });
    for (const track of this.stream.getTracks()) pc.addTrack(track, this.stream);
    const peer = { viewer, pc, connection: "", n: 0, chain: Promise.resolve(), restart: false, offered: 0 };
    pc.onicecandidate = ({ candidate }) => {
      if (!candidate || !peer.connection || !this.stream) return;
      this.client
        .sessionSignal(this.session, RTC.ice, JSON.stringify(candidate), {
          to: peer.connection, data: { viewer, n: peer.n },
        })
        .catch(quiet("ICE candidate"));
    };
    pc.onconnectionstatechange = () => this._emit("viewers", { count: this.viewers });
    this._peers.set(viewer, peer);
    return peer;
  }
}

/**
 * An agent's side of a screen share: the picture of the visitor of a session this agent joined.
 * It asks for the picture when made (start()), when the visitor announces a share, and after this
 * client's reconnects; the visitor's reconnects reach it as a new offer (an ICE restart), so the
 * call is renegotiated within the session. Every received track is stopped when the share ends, the
 * session ends, the agent ends it (endSharing()) or the view is closed.
 *
 * Events: "stream" {stream} (show it: `video.srcObject = stream`); "negotiated" {count, restart}
 * (restart: an ICE restart of the live call, after a reconnect);
 * "ended" {reason}: "stopped"/"capture_ended"/… (the visitor's), "agent" (endSharing()),
 * "session_ended", "closed".
 */
export class ScreenView extends EventTarget {
  /**
   * @param {AgentClient} client
   * @param {SessionJoined | string} session what joinSession resolved with, or the session ID
   * @param {{rtcConfiguration?: RTCConfiguration}} [options] as in ScreenShare
   */
  constructor(client, session, { rtcConfiguration = {} } = {}) {
    super();
    this.client = client;
    this.session = typeof session === "string" ? session : session.session;
    this.rtcConfiguration = rtcConfiguration;
    /** this view's ID in the share (`data.viewer`), the same across reconnects */
    this.viewer = newSid();
    /** @type {RTCPeerConnection | null} */
    this.pc = null;
    /** @type {MediaStream | null} the visitor's picture, once it arrives */
    this.stream = null;
    /** answers made, restarts included */
    this.negotiations = 0;
    this.closed = false;
    this._n = 0;
    this._chain = Promise.resolve();
    this._asking = null;
    this._off = listen(client, {
      session_signal: ({ detail }) => this._onSignal(detail),
      connected: () => this.start(), // a reconnect: a new connection for the visitor to offer to
      session_event: ({ detail }) =>
        detail.event === "ended" && detail.session === this.session && this.close("session_ended"),
      session_lost: ({ detail }) => detail.session === this.session && this.close("session_ended"),
      stopped: () => this.close("disconnected"),
    });
  }

  /**
   * Ask the visitor for the picture (a visitor not sharing yet offers when it starts). Asks again
   * while the visitor is between connections.
   * @returns {Promise<void>}
   */
  start() {
    this._asking ??= this._ask().finally(() => (this._asking = null));
    return this._asking;
  }

  async _ask() {
    for (let attempt = 1; !this.closed; attempt++) {
      try {
        await this.client.sessionSignal(this.session, RTC.request, undefined, {
          to: "visitor", data: { viewer: this.viewer },
        });
        return;
      } catch (error) {
        if (error.code !== "member_offline" || attempt >= REQUEST_TRIES) {
          quiet("asking for the picture")(error);
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, REQUEST_PAUSE * 1000));
      }
    }
  }

  /** End the share on both sides: the visitor stops capturing, every viewer's picture ends. */
  async endSharing() {
    this._endPicture("agent");
    await this.client
      .sessionSignal(this.session, RTC.end, undefined, { to: "visitor", data: { viewer: this.viewer, stop: true } })
      .catch(quiet("ending the share"));
  }

  /**
   * Stop viewing and listening (before leaving the session: the visitor drops this viewer).
   * @param {string} [reason]
   */
  async close(reason = "closed") {
    if (this.closed) return;
    this.closed = true;
    this._off();
    this._endPicture(reason);
    if (reason === "closed") {
      await this.client
        .sessionSignal(this.session, RTC.end, undefined, { to: "visitor", data: { viewer: this.viewer } })
        .catch(quiet("leaving the share"));
    }
  }

  /**
   * The received video's inbound-rtp statistics (from getStats()), or null before any.
   * @returns {Promise<{framesDecoded: number, frameWidth?: number, frameHeight?: number,
   *                    framesPerSecond?: number} | null>}
   */
  async videoStats() {
    if (!this.pc) return null;
    for (const report of (await this.pc.getStats()).values()) {
      if (report.type === "inbound-rtp" && report.kind === "video") return report;
    }
    return null;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _endPicture(reason) {
    const had = this.pc !== null;
    stopTracks(this.stream);
    this.pc?.close();
    this.pc = null;
    this.stream = null;
    if (had) this._emit("ended", { reason });
  }

  _newPeer() {
    this.pc?.close();
    stopTracks(this.stream);
    this.stream = null;
    const iceServers = this.client.iceServers?.get(this.session) ?? this.rtcConfiguration.iceServers ?? [];
    const pc = new RTCPeerConnection({ ...this.rtcConfiguration, iceServers });
    pc.ontrack = ({ track, streams }) => {
      if (this.pc !== pc) return;
      this.stream = streams[0] ?? new MediaStream([track]);
      this._emit("stream", { stream: this.stream });
    };
    pc.onicecandidate = ({ candidate }) => {
      if (!candidate || this.pc !== pc) return;
      this.client
        .sessionSignal(this.session, RTC.ice, JSON.stringify(candidate), {
          to: "visitor", data: { viewer: this.viewer, n: this._n },
        })
        .catch(quiet("ICE candidate"));
    };
    pc.onconnectionstatechange = () => {
      // The media path broke with the signalling still up (a network change): ask again.
      if (this.pc === pc && pc.connectionState === "failed") this.start();
    };
    this.pc = pc;
    return pc;
  }

  _onSignal(signal) {
    if (this.closed || signal.session !== this.session) return;
    const mine = signal.data?.viewer === this.viewer;
    if (signal.event === RTC.ready) {
      this.start();
    } else if (signal.event === RTC.offer && mine) {
      this._chain = this._chain.then(() => this._answer(signal)).catch(quiet("answering the offer"));
    } else if (signal.event === RTC.ice && mine && signal.payload) {
      this._chain = this._chain
        .then(async () => {
          if (this.pc && signal.data.n === this._n) await this.pc.addIceCandidate(JSON.parse(signal.payload));
        })
        .catch(quiet("ICE candidate"));
    } else if (signal.event === RTC.end && signal.data?.viewer === undefined && signal.visitor !== undefined) {
      this._endPicture(signal.data?.reason || "stopped");
    }
  }

  async _answer(signal) {
    const n = signal.data.n;
    // The visitor's first offer on a peer connection (n 1) needs a new one here too; later ones restart ICE.
    const pc = n === 1 || !this.pc || DEAD.has(this.pc.connectionState) ? this._newPeer() : this.pc;
    this._n = n;
    await pc.setRemoteDescription({ type: "offer", sdp: signal.payload });
    await pc.setLocalDescription(await pc.createAnswer());
    this.negotiations += 1;
    this._emit("negotiated", { count: this.negotiations, restart: n > 1 });
    await this.client
      .sessionSignal(this.session, RTC.answer, pc.localDescription.sdp, {
        to: "visitor", data: { viewer: this.viewer, n },
      })
      .catch(quiet("answer"));
  }
}
