// The dashboard's only door to the server: the public /v1 API with the signed-in key as a
// bearer token (kept in sessionStorage: gone when the tab closes), and live streams opened
// with short-lived stream tokens (EventSource cannot send headers).

const KEY = "capibara.key";

export function key() {
  return sessionStorage.getItem(KEY);
}

export function setKey(k) {
  if (k) sessionStorage.setItem(KEY, k);
  else sessionStorage.removeItem(KEY);
}

/** An API error: the problem document's detail, with the status. */
export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

/** Call the API; JSON in and out. Throws ApiError on a non-2xx answer. */
export async function api(path, { method = "GET", body, headers = {} } = {}) {
  const h = { Accept: "application/json", ...headers };
  const k = key();
  if (k) h.Authorization = `Bearer ${k}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers: h,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (!res.ok) {
    if (res.status === 401) window.dispatchEvent(new Event("capibara:unauthorized"));
    throw new ApiError(res.status, data);
  }
  return data;
}

/** A binary download with the key (artifacts), as a blob. */
export async function blob(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${key()}` } });
  if (!res.ok) throw new ApiError(res.status, null);
  return res.blob();
}

/** Every page of a list endpoint, up to `max` items. */
export async function all(path, max = 500) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(cursor ? `${path}${sep}cursor=${encodeURIComponent(cursor)}` : path);
    items.push(...(page.items || []));
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

// The server names each SSE event by its type, and EventSource hands named events only to
// listeners of that name: these are the types the pages follow.
const TYPES = [
  "JobSubmitted", "JobScheduled", "JobQueued", "JobStarted", "JobProgress", "JobLog",
  "JobOutputChunk", "JobSucceeded", "JobAttemptFailed", "JobFailed", "JobCancelRequested",
  "JobCanceled", "JobDeduplicated", "JobDebounced", "JobTimedOut", "JobWaiting",
  "RunStarted", "StepReady", "StepStarted", "StepSucceeded", "StepFailed", "StepSkipped",
  "SignalReceived", "RunSucceeded", "RunFailed", "RunCanceled", "RunRetried",
];

/**
 * Follow an SSE endpoint live: each event envelope goes to `onEvent`. Each (re)connection asks
 * for a fresh stream token limited to this one path, and resumes after the last event seen.
 * `terminal(envelope)` says when to stop; when the server ends the stream, `reconnect()` (if
 * given) says whether to follow on. Returns a function that stops it.
 */
export function follow(path, onEvent, { terminal, reconnect } = {}) {
  let source = null;
  let stopped = false;
  let last = null;
  let retry = 500;
  const stop = () => {
    stopped = true;
    if (source) source.close();
  };
  const handle = (msg) => {
    retry = 500;
    let env;
    try {
      env = JSON.parse(msg.data);
    } catch {
      return;
    }
    if (msg.lastEventId) last = msg.lastEventId;
    onEvent(env);
    if (terminal && terminal(env)) stop();
  };
  const connect = async () => {
    if (stopped) return;
    let token;
    try {
      token = (await api("/v1/stream-tokens", { method: "POST", body: { path } })).token;
    } catch {
      retry = Math.min(retry * 2, 10000);
      setTimeout(connect, retry);
      return;
    }
    if (stopped) return;
    const q = new URLSearchParams({ token });
    if (last) q.set("after", last);
    source = new EventSource(`${path}?${q}`);
    source.onmessage = handle;
    for (const t of TYPES) source.addEventListener(t, handle);
    source.onerror = async () => {
      // The stream ended (its terminal event, a restart, a network blip): reconnect with a new
      // token unless the resource says nothing more will come.
      source.close();
      if (stopped) return;
      if (reconnect && !(await reconnect().catch(() => true))) return;
      setTimeout(connect, retry);
    };
  };
  connect();
  return stop;
}
