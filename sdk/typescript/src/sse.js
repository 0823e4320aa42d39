// Server-sent events: a parser for the text/event-stream format (WHATWG HTML §9.2) and a
// reader that follows a Capibara event stream, reconnecting with `Last-Event-ID` so that a
// dropped connection loses and repeats nothing.

import { NetworkError } from "./errors.js";
import { backoffMs, sleep } from "./http.js";

/**
 * Parse an event stream. `chunks` is an async iterable of `Uint8Array` or string pieces, split
 * anywhere (even inside a UTF-8 sequence or between `\r` and `\n`). Yields one
 * `{id, event, data, retry}` per dispatched event: `event` defaults to `"message"`, `data` is
 * the `data:` lines joined with `\n`, `id` is the last id seen (it persists across events, as
 * in a browser), `retry` the last valid `retry:` value in ms, or undefined. Comments and
 * events without data are skipped.
 *
 * @param {AsyncIterable<Uint8Array | string>} chunks
 */
export async function* parseSSE(chunks) {
  const decoder = new TextDecoder("utf-8");
  let buf = "";
  let first = true;
  let lastId = "";
  let retry;
  let data = [];
  let hasData = false;
  let event = "";

  function* lines(final) {
    // Split `buf` into complete lines; a trailing `\r` waits for a possible `\n`.
    let start = 0;
    for (let i = 0; i < buf.length; i++) {
      const c = buf.charCodeAt(i);
      if (c === 10 || c === 13) {
        if (c === 13 && i === buf.length - 1 && !final) break;
        yield buf.slice(start, i);
        if (c === 13 && buf.charCodeAt(i + 1) === 10) i++;
        start = i + 1;
      }
    }
    buf = buf.slice(start);
  }

  function* take(line) {
    if (line === "") {
      if (hasData) {
        yield { id: lastId, event: event || "message", data: data.join("\n"), retry };
      }
      data = [];
      hasData = false;
      event = "";
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "data":
        data.push(value);
        hasData = true;
        break;
      case "event":
        event = value;
        break;
      case "id":
        if (!value.includes("\0")) lastId = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) retry = Number(value);
        break;
      default:
        break;
    }
  }

  for await (const chunk of chunks) {
    buf += typeof chunk === "string" ? chunk : decoder.decode(chunk, { stream: true });
    if (first && buf.length > 0) {
      if (buf.charCodeAt(0) === 0xfeff) buf = buf.slice(1);
      first = false;
    }
    for (const line of lines(false)) yield* take(line);
  }
  buf += decoder.decode();
  for (const line of lines(true)) yield* take(line);
  // An event not followed by a blank line at the end of the stream is not dispatched.
}

/**
 * Follow the SSE stream at `path`: yields each event's envelope (the JSON `data`), reconnecting
 * after a network error with `Last-Event-ID` = the last id received. Ends when the server ends
 * the stream (a job's or run's stream ends after its terminal event), when `signal` aborts
 * (the iterator then returns quietly), or after `maxReconnects` failed reconnects in a row.
 *
 * @param {import("./http.js").Http} http
 * @param {string} path
 * @param {{lastEventId?: string, signal?: AbortSignal, query?: object, reconnect?: boolean, maxReconnects?: number}} [o]
 */
export async function* followSSE(http, path, o = {}) {
  let lastId = o.lastEventId != null ? String(o.lastEventId) : undefined;
  const reconnect = o.reconnect ?? true;
  const maxReconnects = o.maxReconnects ?? 10;
  let failures = 0;
  let retryMs;
  for (;;) {
    const ctrl = new AbortController();
    const onAbort = () => ctrl.abort(o.signal.reason);
    if (o.signal?.aborted) return;
    o.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      let res;
      try {
        res = await http.request("GET", path, {
          query: o.query,
          headers: { accept: "text/event-stream", "last-event-id": lastId },
          signal: ctrl.signal,
          stream: true,
          idempotent: true,
        });
      } catch (err) {
        if (o.signal?.aborted) return;
        throw err; // an error answer, or the transport's retries are used up
      }
      try {
        for await (const ev of parseSSE(res.body)) {
          failures = 0;
          if (ev.retry !== undefined) retryMs = ev.retry;
          if (ev.id !== "") lastId = ev.id;
          let envelope;
          try {
            envelope = JSON.parse(ev.data);
          } catch {
            envelope = { id: ev.id, type: ev.event, data: ev.data };
          }
          yield envelope;
        }
        return; // the server ended the stream
      } catch (err) {
        if (o.signal?.aborted) return;
        if (!reconnect || failures >= maxReconnects) {
          throw new NetworkError(`GET ${path}: event stream broke: ${err?.message ?? err}`, {
            cause: err,
          });
        }
      }
    } finally {
      o.signal?.removeEventListener("abort", onAbort);
      ctrl.abort();
    }
    try {
      await sleep(retryMs ?? backoffMs(failures), o.signal);
    } catch {
      return;
    }
    failures++;
  }
}
