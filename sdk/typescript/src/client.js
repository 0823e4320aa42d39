// The client API (docs/api.md): jobs, events, kinds, workflows and runs, schedules, and the
// worker protocol's registration and lease calls (docs/workers.md).

import { WaitTimeoutError, errorFromResponse } from "./errors.js";
import { Http } from "./http.js";
import { Lease, clean, enc } from "./lease.js";
import { followSSE } from "./sse.js";

const TERMINAL_JOB = new Set(["succeeded", "failed", "canceled"]);
const TERMINAL_RUN = new Set(["succeeded", "failed", "canceled"]);

// camelCase submission options → API fields. Other keys pass through unchanged.
const SUBMIT_FIELDS = {
  runAt: "run_at",
  maxAttempts: "max_attempts",
  timeoutS: "timeout_s",
  callbackUrl: "callback_url",
  callbackEvents: "callback_events",
};
// Options that shape the request, not the submission.
const REQUEST_OPTS = new Set(["idempotencyKey", "waitS", "signal"]);

/** A job submission body from `kind`, `input` and options. */
export function submission(kind, input, opts = {}) {
  const body = { kind };
  if (input !== undefined) body.input = input;
  for (const [k, v] of Object.entries(opts)) {
    if (REQUEST_OPTS.has(k) || v === undefined) continue;
    body[SUBMIT_FIELDS[k] ?? k] = v;
  }
  return body;
}

function preferWait(waitS) {
  return waitS === undefined || waitS === null ? undefined : `wait=${waitS}`;
}

/** Whether a job status is final. */
export function isTerminal(status) {
  return TERMINAL_JOB.has(status);
}

export class Client {
  /**
   * @param {object} [o]
   * @param {string} [o.url] default `CAPIBARA_URL`, else `http://127.0.0.1:8080`
   * @param {string} [o.apiKey] default `CAPIBARA_API_KEY`
   * @param {number} [o.maxRetries] retries of a failed idempotent call (default 3)
   * @param {number} [o.timeoutMs] per request, on top of any server-side wait (default 30000)
   * @param {typeof fetch} [o.fetch]
   */
  constructor(o = {}) {
    const env = globalThis.process?.env ?? {};
    this.url = o.url ?? env.CAPIBARA_URL ?? "http://127.0.0.1:8080";
    this.http = new Http({
      url: this.url,
      apiKey: o.apiKey ?? env.CAPIBARA_API_KEY,
      maxRetries: o.maxRetries,
      timeoutMs: o.timeoutMs,
      fetch: o.fetch,
    });
  }

  async #json(method, path, o) {
    return (await this.http.request(method, path, o)).body;
  }

  // ---- jobs ----

  /**
   * Submit a job. Options: the submission's fields (`queue`, `priority`, `runAt`,
   * `maxAttempts`, `timeoutS`, `backoff`, `tags`, `callbackUrl`, `callbackEvents`; snake_case
   * works too), `idempotencyKey` (also makes the call safe to retry), `waitS` (`Prefer: wait`,
   * ≤ 60: the answer is the finished job if it ends in time). Resolves the job.
   */
  async submit(kind, input, opts = {}) {
    return this.#json("POST", "/v1/jobs", {
      body: submission(kind, input, opts),
      headers: { prefer: preferWait(opts.waitS), "idempotency-key": opts.idempotencyKey },
      idempotent: opts.idempotencyKey !== undefined,
      timeoutMs: waitTimeout(this, opts.waitS),
      signal: opts.signal,
    });
  }

  /**
   * Submit many jobs at once, all or nothing: `jobs` = `[{kind, input, ...options}]`.
   * Resolves the jobs in the same order.
   */
  async submitBatch(jobs, opts = {}) {
    const body = {
      jobs: jobs.map(({ kind, input, ...rest }) => submission(kind, input, rest)),
    };
    const res = await this.#json("POST", "/v1/jobs/batch", {
      body,
      headers: { "idempotency-key": opts.idempotencyKey },
      idempotent: opts.idempotencyKey !== undefined,
      signal: opts.signal,
    });
    return res.items;
  }

  /** The job. `waitS`: wait up to that long (≤ 60) for it to end. */
  async get(id, opts = {}) {
    return this.#json("GET", `/v1/jobs/${enc(id)}`, {
      headers: { prefer: preferWait(opts.waitS) },
      timeoutMs: waitTimeout(this, opts.waitS),
      signal: opts.signal,
    });
  }

  /**
   * Wait until the job ends (`Prefer: wait` in a loop) and resolve it, whatever its status.
   * Throws `WaitTimeoutError` (with `.job`) after `timeoutMs` (default: no limit).
   */
  async wait(id, { timeoutMs = Infinity, signal } = {}) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      const waitS = Math.max(0, Math.min(60, Math.ceil(left / 100) / 10));
      const job = await this.get(id, { waitS: Number.isFinite(waitS) ? waitS : 60, signal });
      if (isTerminal(job.status)) return job;
      if (Date.now() >= deadline) {
        throw new WaitTimeoutError(`job ${id} still ${job.status} after ${timeoutMs} ms`, job);
      }
    }
  }

  /** `GET /v1/jobs?status=&kind=&queue=&tag=&limit=&cursor=`: a page `{items, next_cursor}`. */
  async listJobs(query = {}, opts = {}) {
    return this.#json("GET", "/v1/jobs", { query, signal: opts.signal });
  }

  /** One page of the job's events `{items, next_cursor}`: `after` (an event id), `limit`. */
  async events(id, { after, limit, signal } = {}) {
    return this.#json("GET", `/v1/jobs/${enc(id)}/events`, { query: { after, limit }, signal });
  }

  /** Every event of the job so far (follows `next_cursor`). */
  async allEvents(id, { signal } = {}) {
    const out = [];
    let after;
    for (;;) {
      const page = await this.events(id, { after, limit: 500, signal });
      out.push(...page.items);
      if (!page.next_cursor) return out;
      after = page.next_cursor;
    }
  }

  /**
   * The job's events as they happen (SSE): an async iterator of event envelopes
   * `{id, type, version, data, metadata, recorded_at, …}`, from the first (or after
   * `lastEventId`), ending after the terminal event. A dropped connection is resumed with
   * `Last-Event-ID`: no gap, no duplicate. Break out of the loop or abort `signal` to stop.
   */
  stream(id, opts = {}) {
    return followSSE(this.http, `/v1/jobs/${enc(id)}/events`, opts);
  }

  /** Cancel: a queued job at once, a running one is told to stop. Resolves the job. */
  async cancel(id, opts = {}) {
    return this.#json("POST", `/v1/jobs/${enc(id)}/cancel`, { idempotent: true, signal: opts.signal });
  }

  /** Queue a failed or canceled job again with a fresh budget of attempts. Resolves the job. */
  async retry(id, opts = {}) {
    return this.#json("POST", `/v1/jobs/${enc(id)}/retry`, { signal: opts.signal });
  }

  /**
   * The namespace's event firehose as SSE (`/v1/events`): filters `types` (array),
   * `streamType`, `kind`, `tag` (array of `k:v`); `lastEventId` to resume. Never ends by itself.
   */
  streamAll({ types, streamType, kind, tag, ...opts } = {}) {
    const query = clean({
      types: Array.isArray(types) ? types.join(",") : types,
      stream_type: streamType,
      kind,
      tag,
    });
    return followSSE(this.http, "/v1/events", { ...opts, query });
  }

  // ---- kinds ----

  /**
   * Create or replace your kind `name`: `spec` = `{description, queue, input_schema,
   * output_schema, timeout_s, max_attempts, priority, mode}` (all optional). Resolves the kind.
   */
  async putKind(name, spec = {}, opts = {}) {
    return this.#json("PUT", `/v1/kinds/${enc(name)}`, { body: spec, signal: opts.signal });
  }

  async getKind(name, opts = {}) {
    return this.#json("GET", `/v1/kinds/${enc(name)}`, { signal: opts.signal });
  }

  /** The built-in kinds and the namespace's own. Resolves the list of kinds. */
  async listKinds(opts = {}) {
    const res = await this.#json("GET", "/v1/kinds", { signal: opts.signal });
    return Array.isArray(res) ? res : res.items;
  }

  /** Stop new submissions of the kind (jobs already submitted still run). */
  async deleteKind(name, opts = {}) {
    await this.#json("DELETE", `/v1/kinds/${enc(name)}`, { signal: opts.signal });
  }

  // ---- workflows and runs ----

  /** Create a workflow from its definition (docs/workflows.md). Resolves the workflow. */
  async createWorkflow(definition, opts = {}) {
    return this.#json("POST", "/v1/workflows", { body: definition, signal: opts.signal });
  }

  async getWorkflow(id, opts = {}) {
    return this.#json("GET", `/v1/workflows/${enc(id)}`, { signal: opts.signal });
  }

  async deleteWorkflow(id, opts = {}) {
    await this.#json("DELETE", `/v1/workflows/${enc(id)}`, { signal: opts.signal });
  }

  /**
   * Start a run of the workflow's latest version. Options: `waitS` (≤ 60), `idempotencyKey`,
   * `callbackUrl`. Resolves the run.
   */
  async startRun(workflowId, input, opts = {}) {
    return this.#json("POST", `/v1/workflows/${enc(workflowId)}/runs`, {
      body: clean({ input, callback_url: opts.callbackUrl }),
      headers: { prefer: preferWait(opts.waitS), "idempotency-key": opts.idempotencyKey },
      idempotent: opts.idempotencyKey !== undefined,
      timeoutMs: waitTimeout(this, opts.waitS),
      signal: opts.signal,
    });
  }

  /** The run (each step's status, job, output). `waitS`: wait up to that long for it to end. */
  async getRun(id, opts = {}) {
    return this.#json("GET", `/v1/runs/${enc(id)}`, {
      headers: { prefer: preferWait(opts.waitS) },
      timeoutMs: waitTimeout(this, opts.waitS),
      signal: opts.signal,
    });
  }

  /** Wait until the run ends; `WaitTimeoutError` after `timeoutMs` (default: no limit). */
  async waitRun(id, { timeoutMs = Infinity, signal } = {}) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      const waitS = Math.max(0, Math.min(60, Math.ceil(left / 100) / 10));
      const run = await this.getRun(id, { waitS: Number.isFinite(waitS) ? waitS : 60, signal });
      if (TERMINAL_RUN.has(run.status)) return run;
      if (Date.now() >= deadline) {
        throw new WaitTimeoutError(`run ${id} still ${run.status} after ${timeoutMs} ms`, run);
      }
    }
  }

  async cancelRun(id, opts = {}) {
    return this.#json("POST", `/v1/runs/${enc(id)}/cancel`, { idempotent: true, signal: opts.signal });
  }

  /** The run's events as SSE, like `stream` for a job. */
  streamRun(id, opts = {}) {
    return followSSE(this.http, `/v1/runs/${enc(id)}/events`, opts);
  }

  // ---- schedules ----

  /**
   * Create a schedule: `{name, cron, timezone?, target: {type: "job", job: {kind, input}} |
   * {type: "workflow", workflow_id, input}, overlap?, catch_up?, jitter_s?, start_at?, end_at?}`.
   */
  async createSchedule(spec, opts = {}) {
    return this.#json("POST", "/v1/schedules", { body: spec, signal: opts.signal });
  }

  async getSchedule(id, opts = {}) {
    return this.#json("GET", `/v1/schedules/${enc(id)}`, { signal: opts.signal });
  }

  /** A page `{items, next_cursor}` of schedules (`limit`, `cursor`). */
  async listSchedules(query = {}, opts = {}) {
    return this.#json("GET", "/v1/schedules", { query, signal: opts.signal });
  }

  async deleteSchedule(id, opts = {}) {
    await this.#json("DELETE", `/v1/schedules/${enc(id)}`, { signal: opts.signal });
  }

  // ---- the worker protocol ----

  /**
   * Register a worker: `{kinds, queues?, concurrency?, name?, labels?, version?}` where each
   * kind is a name or `{name, ...spec}`. Resolves `{id, lease_s, heartbeat_s, kinds, queues, …}`.
   */
  async registerWorker(spec, opts = {}) {
    return this.#json("POST", "/v1/workers", { body: spec, signal: opts.signal });
  }

  /**
   * Lease up to `maxJobs` jobs, holding the call up to `waitMs` while none is waiting.
   * Resolves a list of `Lease`s (possibly empty).
   */
  async leaseJobs(workerId, { maxJobs = 1, waitMs = 30000, signal } = {}) {
    const res = await this.#json("POST", `/v1/workers/${enc(workerId)}/lease`, {
      body: { max_jobs: maxJobs, wait_ms: waitMs },
      timeoutMs: waitMs + this.http.timeoutMs,
      signal,
    });
    return (res?.jobs ?? []).map((item) => new Lease(this, item));
  }

  /**
   * Complete up to 100 jobs of worker `workerId` in one call: `[{id, lease, output?}]` (`lease`
   * the token). Resolves one entry per job, in order: `null` when it was recorded, else the
   * typed error the one-job `complete` would have thrown (`LeaseLostError`, `ValidationError`, …).
   */
  async completeJobs(workerId, jobs, opts = {}) {
    const res = await this.#json("POST", `/v1/workers/${enc(workerId)}/complete`, {
      body: { jobs: jobs.map((j) => clean({ id: j.id, lease: j.lease, output: j.output })) },
      idempotent: true,
      signal: opts.signal,
    });
    return (res?.results ?? []).map((r) =>
      r.status === 200 ? null : errorFromResponse(r.status, r.problem ?? null),
    );
  }

  /** Mark the worker stopped (release or finish its jobs first). */
  async deregisterWorker(workerId, opts = {}) {
    await this.#json("DELETE", `/v1/workers/${enc(workerId)}`, { signal: opts.signal });
  }

  /** Registered workers (admin keys). Resolves the list. */
  async listWorkers(opts = {}) {
    const res = await this.#json("GET", "/v1/workers", { signal: opts.signal });
    return Array.isArray(res) ? res : res.items;
  }
}

function waitTimeout(client, waitS) {
  return waitS ? waitS * 1000 + client.http.timeoutMs : undefined;
}
