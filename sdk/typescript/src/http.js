// One HTTP call to the API: auth, JSON in and out, problem JSON to typed errors, per-request
// timeouts, and retries with backoff (network errors and 503 for idempotent calls only; 429,
// which the server answers before doing anything, for every call).

import { CapibaraError, NetworkError, errorFromResponse, retryAfterSeconds } from "./errors.js";

export const VERSION = "0.1.0";

/** Delay of retry `n` (0-based): 250 ms doubling, at most 5 s, ±20 % jitter. */
export function backoffMs(n, { initialMs = 250, maxMs = 5000 } = {}) {
  const base = Math.min(maxMs, initialMs * 2 ** n);
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(done, ms);
    function done() {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }
    function onAbort() {
      clearTimeout(t);
      reject(signal.reason);
    }
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * A signal that aborts when any of `signals` does (AbortSignal.any is Node ≥ 20.3).
 * Returns `{signal, dispose}`; call dispose when done to drop the listeners.
 */
export function anySignal(signals) {
  const list = signals.filter(Boolean);
  const ctrl = new AbortController();
  const listeners = [];
  for (const s of list) {
    if (s.aborted) {
      ctrl.abort(s.reason);
      break;
    }
    const on = () => ctrl.abort(s.reason);
    s.addEventListener("abort", on, { once: true });
    listeners.push([s, on]);
  }
  return {
    signal: ctrl.signal,
    dispose() {
      for (const [s, on] of listeners) s.removeEventListener("abort", on);
    },
  };
}

/** The HTTP transport of a `Client`. */
export class Http {
  /**
   * @param {object} o
   * @param {string} o.url base URL (`http://127.0.0.1:8080`)
   * @param {string} [o.apiKey]
   * @param {number} [o.maxRetries] retries after the first try (default 3)
   * @param {number} [o.timeoutMs] per request, on top of any server-side wait (default 30000)
   * @param {typeof fetch} [o.fetch]
   */
  constructor({ url, apiKey, maxRetries = 3, timeoutMs = 30000, fetch: f } = {}) {
    this.url = String(url).replace(/\/+$/, "");
    this.apiKey = apiKey;
    this.maxRetries = maxRetries;
    this.timeoutMs = timeoutMs;
    this.fetch = f ?? globalThis.fetch;
  }

  /** Full URL of `path` with `query` (undefined values left out, arrays repeated). */
  href(path, query) {
    const u = new URL(this.url + path);
    for (const [k, v] of Object.entries(query ?? {})) {
      if (v === undefined || v === null) continue;
      for (const x of Array.isArray(v) ? v : [v]) u.searchParams.append(k, String(x));
    }
    return u.toString();
  }

  headers(extra) {
    const h = { "user-agent": `capibara-sdk-node/${VERSION}`, accept: "application/json" };
    if (this.apiKey) h.authorization = `Bearer ${this.apiKey}`;
    for (const [k, v] of Object.entries(extra ?? {})) {
      if (v !== undefined && v !== null) h[k.toLowerCase()] = String(v);
    }
    return h;
  }

  /**
   * Send one request; retries as described above. Resolves `{status, headers, body}` for a
   * 2xx answer (body: parsed JSON, or null when empty), throws a `ProblemError` subclass for
   * an error answer, a `NetworkError` when no answer came, or the signal's reason on abort.
   *
   * @param {string} method
   * @param {string} path
   * @param {object} [o]
   * @param {object} [o.query]
   * @param {any} [o.body] JSON-encoded when not undefined
   * @param {object} [o.headers]
   * @param {boolean} [o.idempotent] default: GET, PUT, DELETE, HEAD
   * @param {AbortSignal} [o.signal]
   * @param {number} [o.timeoutMs] this request's timeout (default: the client's)
   * @param {boolean} [o.stream] resolve with the raw Response (for SSE); no timeout
   */
  async request(method, path, o = {}) {
    const idempotent = o.idempotent ?? ["GET", "PUT", "DELETE", "HEAD"].includes(method);
    const url = this.href(path, o.query);
    const headers = this.headers(o.headers);
    let body;
    if (o.body !== undefined) {
      body = JSON.stringify(o.body);
      headers["content-type"] = "application/json";
    }
    for (let attempt = 0; ; attempt++) {
      // A stream has no timeout and keeps following the caller's signal while it is read.
      const timeout = o.stream ? null : AbortSignal.timeout(o.timeoutMs ?? this.timeoutMs);
      const { signal, dispose } = o.stream
        ? { signal: o.signal, dispose() {} }
        : anySignal([o.signal, timeout]);
      let res;
      try {
        res = await this.fetch(url, { method, headers, body, signal });
      } catch (err) {
        dispose();
        if (o.signal?.aborted) throw o.signal.reason;
        const timedOut = timeout?.aborted || err?.name === "TimeoutError";
        const e = new NetworkError(
          `${method} ${path}: ${timedOut ? "timed out" : describe(err)}`,
          { cause: err },
        );
        if (idempotent && attempt < this.maxRetries) {
          await sleep(backoffMs(attempt), o.signal);
          continue;
        }
        throw e;
      }
      if (o.stream && res.ok) {
        dispose();
        return res;
      }
      let parsed;
      try {
        parsed = await readBody(res);
      } catch (err) {
        dispose();
        if (o.signal?.aborted) throw o.signal.reason;
        if (idempotent && attempt < this.maxRetries) {
          await sleep(backoffMs(attempt), o.signal);
          continue;
        }
        throw new NetworkError(`${method} ${path}: ${describe(err)}`, { cause: err });
      }
      dispose();
      if (res.ok) return { status: res.status, headers: res.headers, body: parsed };
      const retryable = res.status === 429 || (idempotent && [502, 503, 504].includes(res.status));
      if (retryable && attempt < this.maxRetries) {
        const after = retryAfterSeconds(res.headers);
        const ms = after !== undefined ? Math.min(after * 1000, 30000) : backoffMs(attempt);
        await sleep(ms, o.signal);
        continue;
      }
      throw errorFromResponse(res.status, parsed, res.headers);
    }
  }
}

async function readBody(res) {
  const text = await res.text();
  if (text === "") return null;
  const ct = res.headers.get("content-type") ?? "";
  if (ct.includes("json")) {
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }
  return text;
}

function describe(err) {
  if (err instanceof CapibaraError) return err.message;
  const cause = err?.cause;
  const c = cause?.code ?? cause?.message;
  return c ? `${err.message} (${c})` : String(err?.message ?? err);
}
