// What Herald's own pages share: where credentials come from, and announcing changes.
//
// A real deployment's back end mints visitor tokens and agent keys; these pages
// take them from the URL fragment (#group=acme&token=..., never sent to any
// server nor logged) or a form. In demo mode (a zero-config `herald serve`)
// Herald mints them itself for its demo group, for this machine only.

/** The URL fragment's parameters (#group=acme&visitor=cust-42&token=...). */
export function fragment() {
  return new URLSearchParams(location.hash.slice(1));
}

/**
 * A credential for the demo group from POST /demo/credentials, or null when
 * this server is not in demo mode (the route answers 404).
 * @param {"visitor"|"agent"} role
 * @param {string} id visitor or agent ID
 * @returns {Promise<{group: string, token: string} | null>}
 */
export async function demoCredential(role, id) {
  const response = await fetch("/demo/credentials", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ role, id }),
  });
  if (response.status === 404) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error?.message || `demo credentials: HTTP ${response.status}`);
  return body;
}

/** The demo group's ID when this server mints demo credentials, else null. */
export async function demoGroup() {
  try {
    const response = await fetch("/demo/credentials");
    return response.ok ? (await response.json()).group : null;
  } catch {
    return null;
  }
}

/** Put `text` in the element, and in the page's polite live region for screen readers. */
export function say(element, text) {
  if (element) element.textContent = text;
  const live = document.getElementById("announcer");
  if (live) live.textContent = text;
}

/** Append a timestamped line to a log list (newest first), keeping it short. */
export function logLine(list, text) {
  const item = document.createElement("li");
  const time = document.createElement("time");
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString();
  item.append(time, " ", text);
  list.prepend(item);
  while (list.children.length > 50) list.lastElementChild.remove();
}

/** An element by id, or an error naming the missing one. */
export function byId(id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`page has no #${id}`);
  return element;
}
