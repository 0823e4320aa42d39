// A worker: handlers registered by kind, run over the HTTP worker protocol (docs/workers.md).
// It registers its kinds, long-polls leases for as many jobs as it has free slots, heartbeats
// each running job (a cancel aborts the job's AbortSignal), enforces timeout_s, reports the
// outcome, and on SIGTERM/SIGINT or stop() stops leasing, lets running handlers finish within
// a grace period, releases the rest and deregisters. A lost lease drops the job, never the
// worker.

import { Client } from "./client.js";
import {
  CanceledError,
  ConflictError,
  FatalError,
  JobTimeoutError,
  LeaseLostError,
  NotFoundError,
  RetryAfterError,
  ShutdownError,
  ValidationError,
} from "./errors.js";
import { Completions } from "./completions.js";
import { backoffMs, sleep } from "./http.js";

// Lease calls out at once (see #loop).
const LEASES_IN_FLIGHT = 2;

const SPEC_FIELDS = {
  description: "description",
  queue: "queue",
  inputSchema: "input_schema",
  outputSchema: "output_schema",
  timeoutS: "timeout_s",
  maxAttempts: "max_attempts",
  priority: "priority",
};

/** Logs warnings and errors to stderr; info and debug are dropped. */
export const defaultLogger = {
  debug() {},
  info() {},
  warn: (msg, fields) => console.warn(`[capibara worker] ${msg}`, fields ?? ""),
  error: (msg, fields) => console.error(`[capibara worker] ${msg}`, fields ?? ""),
};

/** What a handler receives: the job, its AbortSignal, and calls to report while it runs. */
export class Job {
  #lease;
  #logger;
  #seq = 0;

  constructor(lease, signal, logger) {
    this.#lease = lease;
    this.#logger = logger;
    const j = lease.job;
    /** @type {string} */ this.id = j.id;
    /** @type {string} */ this.kind = j.kind;
    this.input = j.input;
    /** @type {number} */ this.attempt = j.attempt;
    /** @type {number} */ this.maxAttempts = j.max_attempts;
    this.tags = j.tags ?? {};
    /** Aborted when the job is canceled, times out, loses its lease, or is released. */
    this.signal = signal;
    /** The job as leased. */
    this.data = j;
  }

  /** The lease (token, raw protocol calls). */
  get lease() {
    return this.#lease;
  }

  async #best(what, call) {
    try {
      await call();
    } catch (err) {
      if (err instanceof LeaseLostError) throw err;
      this.#logger.warn(`job ${this.id}: ${what} not recorded: ${err?.message ?? err}`);
    }
  }

  /**
   * Record progress `{percent?, message?, data?}`. Best effort: a failed call is logged, except
   * a lost lease, which throws `LeaseLostError` (stop working: the job is no longer yours).
   */
  progress(p) {
    const q = { ...p };
    if (typeof q.message === "string") q.message = q.message.slice(0, 1000);
    return this.#best("progress", () => this.#lease.progress(q));
  }

  /** Record a log line (`level`: debug, info, warn, error). Best effort, like `progress`. */
  log(message, level = "info") {
    return this.#best("log", () => this.#lease.logs([{ level, message: String(message).slice(0, 10000) }]));
  }

  /** Stream an output chunk to SSE readers (numbered from 0). Best effort, like `progress`. */
  chunk(data) {
    const seq = this.#seq++;
    return this.#best("chunk", () => this.#lease.chunk(seq, data));
  }
}

export class Worker {
  #handlers = new Map();
  #completions = null;
  #jobs = new Map(); // job id → entry
  #busy = 0; // handlers still running: what counts against the concurrency
  #asked = 0; // slots that lease calls in flight may fill
  #stopping = false;
  #pollCtrl = new AbortController();
  #stopCtrl = new AbortController();
  #wakers = []; // lease loops waiting for a free slot
  #loopDone = null;
  #reregistering = null;
  #startPromise = null;
  #stopPromise = null;
  #skipGrace = null;
  #signalHandlers = [];

  /**
   * @param {object} [o]
   * @param {Client} [o.client] default `new Client()` (from the environment)
   * @param {number} [o.concurrency] jobs run at once (default 32)
   * @param {string} [o.name]
   * @param {Record<string,string>} [o.labels]
   * @param {string} [o.version]
   * @param {string[]} [o.queues] default: each kind's queue
   * @param {number} [o.graceMs] on stop, how long running handlers may finish (default 30000)
   * @param {number} [o.pollMs] long-poll hold (default 30000)
   * @param {object} [o.logger] `{debug, info, warn, error}`
   */
  constructor(o = {}) {
    this.client = o.client ?? new Client();
    this.concurrency = o.concurrency ?? 32;
    this.name = o.name;
    this.labels = o.labels;
    this.version = o.version;
    this.queues = o.queues;
    this.graceMs = o.graceMs ?? 30000;
    this.pollMs = o.pollMs ?? 30000;
    this.logger = o.logger ?? defaultLogger;
    /** The registration answer (`id`, `lease_s`, `heartbeat_s`, …) once started. */
    this.registration = null;
  }

  /** The worker's id once registered. */
  get id() {
    return this.registration?.id;
  }

  /** How many jobs are running now. */
  get running() {
    return this.#jobs.size;
  }

  /**
   * Run `fn(job)` for jobs of `kind`; its return value is the output. Options (the kind's
   * spec, sent when the worker registers; leave them all out to keep the kind as it is):
   * `inputSchema`, `outputSchema`, `queue`, `timeoutS`, `maxAttempts`, `priority`,
   * `description`.
   */
  handle(kind, fn, opts = {}) {
    if (this.#startPromise) throw new Error("handle() must be called before the worker starts");
    if (typeof fn !== "function") throw new TypeError("handler must be a function");
    const spec = {};
    for (const [k, v] of Object.entries(opts)) {
      if (v !== undefined && SPEC_FIELDS[k]) spec[SPEC_FIELDS[k]] = v;
    }
    this.#handlers.set(kind, { fn, spec, timeoutS: opts.timeoutS });
    return this;
  }

  /** The `kinds` of the registration: a name, or `{name, ...spec}` when options were given. */
  kinds() {
    return [...this.#handlers].map(([name, h]) =>
      Object.keys(h.spec).length ? { name, ...h.spec } : name,
    );
  }

  async #register() {
    const body = { kinds: this.kinds(), concurrency: this.concurrency };
    if (this.name !== undefined) body.name = this.name;
    if (this.labels !== undefined) body.labels = this.labels;
    if (this.version !== undefined) body.version = this.version;
    if (this.queues !== undefined) body.queues = this.queues;
    this.registration = await this.client.registerWorker(body);
    this.logger.info(`registered worker ${this.registration.id}`, this.registration);
    return this.registration;
  }

  // Register again after the registration was lost; the lease loops share one call.
  #reregister() {
    this.#reregistering ??= this.#register().finally(() => (this.#reregistering = null));
    return this.#reregistering;
  }

  /**
   * Register, then lease and run jobs in the background. Resolves the registration once
   * registered; `stop()` ends it.
   */
  start() {
    if (!this.#startPromise) {
      this.#startPromise = (async () => {
        if (this.#handlers.size === 0) throw new Error("no handlers: call handle() first");
        await this.#register();
        const loops = Array.from({ length: LEASES_IN_FLIGHT }, () => this.#loop());
        this.#loopDone = Promise.all(loops);
        return this.registration;
      })();
    }
    return this.#startPromise;
  }

  /**
   * Start, and run until SIGTERM or SIGINT (a second one skips the grace period) or `stop()`.
   * Resolves after the shutdown: running jobs finished or released, worker deregistered.
   */
  async run({ signals = ["SIGTERM", "SIGINT"] } = {}) {
    await this.start();
    for (const sig of signals) {
      const h = () => {
        if (this.#stopping) {
          this.logger.warn(`${sig} again: releasing running jobs now`);
          this.#skipGrace?.();
        } else {
          this.logger.info(`${sig}: stopping`);
          this.stop();
        }
      };
      process.on(sig, h);
      this.#signalHandlers.push([sig, h]);
    }
    await this.#loopDone;
    await this.stop();
  }

  // One of LEASES_IN_FLIGHT loops: each asks for the slots that are free and not asked for by
  // the other, so that slots freed while one lease call waits for its answer (a claim's commit)
  // are asked for at once instead of after it. An idle worker has one long poll out: the loop
  // that asked first asked for every slot.
  async #loop() {
    let failures = 0;
    while (!this.#stopping) {
      const free = this.concurrency - this.#busy - this.#asked;
      if (free <= 0) {
        await new Promise((r) => this.#wakers.push(r));
        continue;
      }
      const want = Math.min(free, 100);
      const id = this.id;
      let leases;
      this.#asked += want;
      try {
        leases = await this.client.leaseJobs(id, {
          maxJobs: want,
          waitMs: this.pollMs,
          signal: this.#pollCtrl.signal,
        });
        failures = 0;
      } catch (err) {
        if (this.#stopping) break;
        this.logger.warn(`lease failed: ${err?.message ?? err}`);
        const gone = err instanceof NotFoundError || (err instanceof ConflictError && !(err instanceof LeaseLostError));
        // The registration is gone (or was deregistered): register again, once for both loops.
        if (gone && this.id === id) {
          try {
            await this.#reregister();
          } catch (e) {
            this.logger.warn(`re-register failed: ${e?.message ?? e}`);
          }
        }
        try {
          await sleep(backoffMs(failures++), this.#stopCtrl.signal);
        } catch {
          break;
        }
        continue;
      } finally {
        this.#asked -= want;
        this.#wake();
      }
      for (const lease of leases) {
        if (this.#stopping) {
          // Leased as the stop came: give it straight back.
          lease.release().catch((e) => this.logger.warn(`release ${lease.jobId}: ${e?.message ?? e}`));
        } else {
          this.#start(lease);
        }
      }
    }
  }

  #start(lease) {
    const entry = {
      lease,
      workerId: this.id, // the registration that leased it
      ctrl: new AbortController(),
      phase: "running",
      lost: false,
      released: false,
      slotFree: false,
      hbTimer: null,
      done: null,
    };
    this.#jobs.set(lease.jobId, entry);
    this.#busy += 1;
    entry.done = this.#runJob(entry)
      .catch((err) => this.logger.error(`job ${lease.jobId}: ${err?.stack ?? err}`))
      .finally(() => {
        clearTimeout(entry.hbTimer);
        this.#jobs.delete(lease.jobId);
        this.#freeSlot(entry);
      });
  }

  // The job's handler is done: another job may start (its report goes on without the slot).
  #freeSlot(entry) {
    if (entry.slotFree) return;
    entry.slotFree = true;
    this.#busy -= 1;
    this.#wake();
  }

  // Wake the lease loops waiting for a slot.
  #wake() {
    const wakers = this.#wakers;
    this.#wakers = [];
    for (const w of wakers) w();
  }

  #heartbeats(entry) {
    const everyMs = Math.max(100, (this.registration?.heartbeat_s ?? 10) * 1000);
    const beat = async () => {
      if (entry.phase !== "running") return;
      try {
        const hb = await entry.lease.heartbeat();
        if (hb?.cancel_requested && !entry.ctrl.signal.aborted) {
          entry.ctrl.abort(new CanceledError(`job ${entry.lease.jobId} was canceled`));
        }
      } catch (err) {
        if (err instanceof LeaseLostError || err instanceof ConflictError) {
          entry.lost = true;
          if (!entry.ctrl.signal.aborted) entry.ctrl.abort(err);
          return;
        }
        this.logger.warn(`heartbeat ${entry.lease.jobId}: ${err?.message ?? err}`);
      }
      if (entry.phase === "running") entry.hbTimer = setTimeout(beat, everyMs);
    };
    entry.hbTimer = setTimeout(beat, everyMs);
  }

  async #runJob(entry) {
    const { lease, ctrl } = entry;
    const handler = this.#handlers.get(lease.job.kind);
    if (!handler) {
      this.logger.warn(`no handler for kind ${lease.job.kind}; releasing ${lease.jobId}`);
      entry.phase = "reporting";
      await this.#quiet(entry, () => lease.release());
      return;
    }
    this.#heartbeats(entry);
    const timeoutS = lease.job.timeout_s ?? handler.timeoutS;
    const timer = timeoutS
      ? setTimeout(
          () => ctrl.abort(new JobTimeoutError(`job ${lease.jobId} timed out after ${timeoutS} s`)),
          timeoutS * 1000,
        )
      : null;
    const job = new Job(lease, ctrl.signal, this.logger);
    let outcome;
    try {
      const aborted = new Promise((_, reject) => {
        if (ctrl.signal.aborted) reject(ctrl.signal.reason);
        ctrl.signal.addEventListener("abort", () => reject(ctrl.signal.reason), { once: true });
      });
      aborted.catch(() => {});
      const output = await Promise.race([Promise.resolve().then(() => handler.fn(job)), aborted]);
      outcome = { ok: true, output };
    } catch (err) {
      outcome = { ok: false, err: ctrl.signal.aborted ? ctrl.signal.reason : err };
    } finally {
      clearTimeout(timer);
    }
    if (entry.released) return; // given back by stop()
    entry.phase = "reporting";
    clearTimeout(entry.hbTimer);
    if (entry.lost) {
      this.logger.warn(`job ${lease.jobId}: lease lost; dropped`);
      return;
    }
    this.#freeSlot(entry);
    await this.#report(entry, outcome);
  }

  async #report(entry, outcome) {
    const { lease } = entry;
    if (outcome.ok) {
      try {
        this.#completions ??= new Completions(this.client);
        await this.#completions.complete(entry.workerId, lease, outcome.output);
      } catch (err) {
        if (err instanceof ValidationError) {
          // The output does not match the kind's output_schema.
          await this.#quiet(entry, () =>
            lease.fail(
              { type: "invalid_output", message: err.detail || err.message },
              { retryable: false },
            ),
          );
        } else {
          this.#dropped(entry, "complete", err);
        }
      }
      return;
    }
    const err = outcome.err;
    let error;
    let opts = {};
    if (err instanceof LeaseLostError) {
      this.logger.warn(`job ${lease.jobId}: lease lost; dropped`);
      return;
    } else if (err instanceof CanceledError) {
      error = { type: "canceled", message: err.message };
      opts = { retryable: false };
    } else if (err instanceof JobTimeoutError) {
      error = { type: "timeout", message: err.message };
    } else if (err instanceof FatalError) {
      error = { type: err.type, message: err.message };
      opts = { retryable: false };
    } else if (err instanceof RetryAfterError) {
      error = { type: err.type, message: err.message };
      opts = { retryable: true, retryAfterS: err.seconds };
    } else {
      error = {
        type: String(err?.name || err?.constructor?.name || "Error"),
        message: String(err?.message ?? err),
      };
    }
    // The protocol's limits: a type of 1-100 characters, a message of at most 10,000.
    error = {
      type: String(error.type ?? "").trim().slice(0, 100) || "Error",
      message: String(error.message ?? "").slice(0, 10000),
    };
    await this.#quiet(entry, () => lease.fail(error, opts));
  }

  async #quiet(entry, call) {
    try {
      await call();
    } catch (err) {
      this.#dropped(entry, "report", err);
    }
  }

  #dropped(entry, what, err) {
    if (err instanceof ConflictError) {
      this.logger.warn(`job ${entry.lease.jobId}: ${what} refused (${err.message}); dropped`);
    } else {
      this.logger.error(
        `job ${entry.lease.jobId}: ${what} failed (${err?.message ?? err}); the lease will expire and the job run again`,
      );
    }
  }

  async #release(entry) {
    if (entry.phase !== "running") return entry.done;
    entry.released = true;
    entry.phase = "released";
    clearTimeout(entry.hbTimer);
    if (!entry.ctrl.signal.aborted) {
      entry.ctrl.abort(new ShutdownError(`worker stopping: job ${entry.lease.jobId} released`));
    }
    try {
      await entry.lease.release();
      this.logger.info(`released ${entry.lease.jobId}`);
    } catch (err) {
      this.#dropped(entry, "release", err);
    }
  }

  /**
   * Stop: no more leases; running handlers get `graceMs` to finish, the rest are released
   * (their signal aborted with a `ShutdownError`); then the worker deregisters. Resolves when
   * done; calling it again returns the same promise.
   */
  stop({ graceMs } = {}) {
    if (this.#stopPromise) return this.#stopPromise;
    const grace = graceMs ?? this.graceMs;
    this.#stopping = true;
    this.#pollCtrl.abort(new ShutdownError("worker stopping"));
    this.#stopCtrl.abort(new ShutdownError("worker stopping"));
    this.#wake();
    this.#stopPromise = (async () => {
      await this.#startPromise?.catch(() => {});
      await this.#loopDone;
      const running = [...this.#jobs.values()].map((e) => e.done);
      if (running.length) {
        this.logger.info(`waiting up to ${grace} ms for ${running.length} running job(s)`);
        let t;
        await Promise.race([
          Promise.allSettled(running),
          new Promise((r) => {
            this.#skipGrace = r;
            t = setTimeout(r, grace);
          }),
        ]);
        clearTimeout(t);
      }
      await Promise.allSettled([...this.#jobs.values()].map((e) => this.#release(e)));
      await Promise.allSettled([...this.#jobs.values()].map((e) => e.done));
      if (this.id) {
        try {
          await this.client.deregisterWorker(this.id);
        } catch (err) {
          this.logger.warn(`deregister failed: ${err?.message ?? err}`);
        }
      }
      for (const [sig, h] of this.#signalHandlers) process.off(sig, h);
      this.#signalHandlers = [];
    })();
    return this.#stopPromise;
  }
}
