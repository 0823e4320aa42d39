// A leased job and the lease-scoped calls of the worker protocol (docs/workers.md §3): each
// carries the token in `Capibara-Lease`; a stale token is a 409 `LeaseLostError` and records
// nothing. `Worker` uses these; call them yourself to speak the protocol by hand.

/** One job leased by a worker, with its lease token. */
export class Lease {
  /**
   * @param {import("./client.js").Client} client
   * @param {{job: object, lease: {token: string, expires_at: string}}} item an item of a lease answer
   */
  constructor(client, item) {
    this.client = client;
    /** The job as leased (`id`, `kind`, `input`, `attempt`, `timeout_s`, …). */
    this.job = item.job;
    this.token = item.lease.token;
    this.expiresAt = item.lease.expires_at;
  }

  get jobId() {
    return this.job.id;
  }

  #call(action, body, { idempotent = false, signal } = {}) {
    return this.client.http.request("POST", `/v1/jobs/${enc(this.job.id)}/${action}`, {
      body,
      headers: { "capibara-lease": this.token },
      idempotent,
      signal,
    });
  }

  /** Renew the lease. Resolves `{cancel_requested, expires_at}`. */
  async heartbeat(opts) {
    const { body } = await this.#call("heartbeat", undefined, { idempotent: true, ...opts });
    if (body?.expires_at) this.expiresAt = body.expires_at;
    return body;
  }

  /** Record `JobProgress`: `{percent?, message?, data?}`. */
  async progress(p, opts) {
    await this.#call("progress", clean({ percent: p?.percent, message: p?.message, data: p?.data }), opts);
  }

  /** Record one `JobLog` per line: `[{level, message}]` (1–100 lines). */
  async logs(lines, opts) {
    await this.#call("logs", { lines }, opts);
  }

  /** Record a `JobOutputChunk` (streamed to SSE readers). */
  async chunk(seq, data, opts) {
    await this.#call("chunks", { seq, data: data ?? null }, opts);
  }

  /** The job succeeded with `output`. Resolves the job. */
  async complete(output, opts) {
    const { body } = await this.#call("complete", output === undefined ? {} : { output }, {
      idempotent: true,
      ...opts,
    });
    return body;
  }

  /**
   * The attempt failed. `error` = `{type, message}`; `retryable` (default true) and
   * `retryAfterS` steer the retry. Resolves the job.
   */
  async fail(error, { retryable, retryAfterS, ...opts } = {}) {
    const { body } = await this.#call(
      "fail",
      clean({ error, retryable, retry_after_s: retryAfterS }),
      { idempotent: true, ...opts },
    );
    return body;
  }

  /** Give the job back (queued again, no attempt used up). Resolves the job. */
  async release(opts) {
    const { body } = await this.#call("release", undefined, { idempotent: true, ...opts });
    return body;
  }
}

export function enc(s) {
  return encodeURIComponent(String(s));
}

export function clean(o) {
  const out = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined) out[k] = v;
  return out;
}
