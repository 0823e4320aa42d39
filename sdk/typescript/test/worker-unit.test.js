// The worker's logic against an in-memory fake of the worker protocol (testing/fake-server.js):
// no Capibara server needed. The same scenarios run against the real server in worker.test.js.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  CanceledError,
  Client,
  FatalError,
  JobTimeoutError,
  LeaseLostError,
  RetryAfterError,
  ShutdownError,
  Worker,
} from "../src/index.js";
import { startFakeServer } from "../testing/fake-server.js";
import { memoryLogger, until } from "../testing/helpers.js";

describe("worker (fake server)", () => {
  let fake;
  let client;
  before(async () => {
    fake = await startFakeServer({ leaseS: 0.6 });
    client = new Client({ url: fake.url, apiKey: fake.apiKey });
  });
  after(async () => fake.close());

  function newWorker(opts = {}) {
    return new Worker({ client, pollMs: 500, logger: memoryLogger(), ...opts });
  }
  const types = (id) => fake.events(id).map((e) => e.type);

  test("successes finishing together are sent in one batch", async () => {
    const w = newWorker({ concurrency: 8 });
    let release;
    const gate = new Promise((r) => (release = r));
    let started = 0;
    w.handle("t.together", async (job) => {
      started += 1;
      if (started === 8) release();
      await gate; // all eight finish at the same moment
      return job.input.n;
    });
    const before = fake.batches.length;
    await w.start();
    const subs = await Promise.all([...Array(8).keys()].map((n) => client.submit("t.together", { n })));
    const done = await Promise.all(subs.map((s) => client.wait(s.id, { timeoutMs: 5000 })));
    await w.stop();
    assert.deepEqual(done.map((d) => d.output), [...Array(8).keys()]);
    const batches = fake.batches.slice(before);
    assert.equal(batches.reduce((a, b) => a + b, 0), 8, String(batches));
    assert.ok(batches.length < 8, `no two successes shared a request: ${batches}`);
    for (const s of subs) assert.equal(types(s.id).filter((t) => t === "JobSucceeded").length, 1);
  });

  test("runs a job with progress, logs and chunks; output is the return value", async () => {
    const w = newWorker();
    w.handle("t.progress", async (job) => {
      await job.progress({ percent: 50, message: "half" });
      await job.log("hello", "warn");
      await job.chunk({ a: 1 });
      await job.chunk({ a: 2 });
      return { doubled: job.input.n * 2, attempt: job.attempt };
    });
    await w.start();
    const sub = await client.submit("t.progress", { n: 21 });
    const job = await client.wait(sub.id, { timeoutMs: 5000 });
    await w.stop();
    assert.equal(job.status, "succeeded");
    assert.deepEqual(job.output, { doubled: 42, attempt: 1 });
    const evs = fake.events(sub.id);
    assert.deepEqual(evs.find((e) => e.type === "JobProgress").data, { percent: 50, message: "half" });
    assert.deepEqual(evs.find((e) => e.type === "JobLog").data, { level: "warn", message: "hello" });
    assert.deepEqual(
      evs.filter((e) => e.type === "JobOutputChunk").map((e) => e.data),
      [{ seq: 0, data: { a: 1 } }, { seq: 1, data: { a: 2 } }],
    );
    // Registered with the kind name only (no spec options), and deregistered on stop.
    assert.equal(fake.workers.get(w.id).status, "stopped");
    assert.deepEqual(fake.workers.get(w.id).body.kinds, ["t.progress"]);
  });

  test("registers kinds with their spec when options are given", async () => {
    const w = newWorker({ name: "n1", labels: { a: "b" }, version: "9" });
    w.handle("t.spec", async () => 1, { inputSchema: { type: "object" }, timeoutS: 7, queue: "q1" });
    await w.start();
    await w.stop();
    const body = fake.workers.get(w.id).body;
    assert.deepEqual(body.kinds, [{ name: "t.spec", input_schema: { type: "object" }, timeout_s: 7, queue: "q1" }]);
    assert.equal(body.name, "n1");
    assert.deepEqual(body.labels, { a: "b" });
    assert.equal(body.version, "9");
    assert.equal(body.concurrency, 32);
  });

  test("a thrown error is retried with its name as type; attempt 2 succeeds", async () => {
    const w = newWorker();
    w.handle("t.retry", async (job) => {
      if (job.attempt === 1) throw new TypeError("boom");
      return "ok";
    });
    await w.start();
    const sub = await client.submit("t.retry", {});
    const job = await client.wait(sub.id, { timeoutMs: 5000 });
    await w.stop();
    assert.equal(job.status, "succeeded");
    assert.equal(job.attempt, 2);
    const failed = fake.events(sub.id).find((e) => e.type === "JobAttemptFailed");
    assert.deepEqual(failed.data.error, { type: "TypeError", message: "boom" });
  });

  test("FatalError fails without retry; RetryAfterError sends retry_after_s", async () => {
    const w = newWorker();
    w.handle("t.fatal", async () => {
      throw new FatalError("bad input", { type: "bad_input" });
    });
    w.handle("t.later", async (job) => {
      if (job.attempt === 1) throw new RetryAfterError(0.3, "busy");
      return "later";
    });
    await w.start();
    const a = await client.submit("t.fatal", {});
    const b = await client.submit("t.later", {});
    const ja = await client.wait(a.id, { timeoutMs: 5000 });
    const jb = await client.wait(b.id, { timeoutMs: 5000 });
    await w.stop();
    assert.equal(ja.status, "failed");
    assert.equal(ja.attempt, 1);
    assert.deepEqual(ja.error, { type: "bad_input", message: "bad input" });
    assert.equal(jb.status, "succeeded");
    const failed = fake.events(b.id).find((e) => e.type === "JobAttemptFailed");
    const started = fake.events(b.id).find((e) => e.type === "JobStarted");
    const retryIn = Date.parse(failed.data.retry_at) - Date.parse(started.recorded_at);
    assert.ok(retryIn >= 250, `retry_at ${retryIn} ms after start, expected ≥ 300`);
  });

  test("a cancel reaches the running handler through its AbortSignal", async () => {
    const w = newWorker();
    let seen;
    let started;
    const running = new Promise((r) => (started = r));
    w.handle("t.cancel", async (job) => {
      started();
      await new Promise((_, reject) =>
        job.signal.addEventListener("abort", () => {
          seen = job.signal.reason;
          reject(job.signal.reason);
        }),
      );
    });
    await w.start();
    const sub = await client.submit("t.cancel", {});
    await running;
    const c = await client.cancel(sub.id);
    assert.equal(c.cancel_requested, true);
    const job = await client.wait(sub.id, { timeoutMs: 5000 });
    await w.stop();
    assert.equal(job.status, "canceled");
    assert.ok(seen instanceof CanceledError);
  });

  test("timeout_s aborts the handler and fails the attempt with type timeout", async () => {
    const w = newWorker();
    let reason;
    w.handle(
      "t.timeout",
      async (job) => {
        if (job.attempt > 1) return "fast";
        await new Promise((_, reject) =>
          job.signal.addEventListener("abort", () => reject((reason = job.signal.reason))),
        );
      },
      { timeoutS: 0.3 },
    );
    await w.start();
    const sub = await client.submit("t.timeout", {});
    const job = await client.wait(sub.id, { timeoutMs: 5000 });
    await w.stop();
    assert.ok(reason instanceof JobTimeoutError);
    assert.equal(job.status, "succeeded");
    const failed = fake.events(sub.id).find((e) => e.type === "JobAttemptFailed");
    assert.equal(failed.data.error.type, "timeout");
  });

  test("heartbeats keep a long job's lease (lease 0.6 s, job 1.5 s)", async () => {
    const w = newWorker();
    w.handle("t.long", async () => {
      await new Promise((r) => setTimeout(r, 1500));
      return "done";
    });
    await w.start();
    const sub = await client.submit("t.long", {});
    const job = await client.wait(sub.id, { timeoutMs: 5000 });
    await w.stop();
    assert.equal(job.status, "succeeded");
    assert.equal(job.attempt, 1);
    assert.ok(!types(sub.id).includes("JobAttemptFailed"));
    assert.ok(fake.requests.filter((r) => r === `POST /v1/jobs/${sub.id}/heartbeat`).length >= 3);
  });

  test("leases at most the free slots (concurrency 2)", async () => {
    const w = newWorker({ concurrency: 2 });
    let now = 0;
    let peak = 0;
    w.handle("t.conc", async () => {
      peak = Math.max(peak, ++now);
      await new Promise((r) => setTimeout(r, 150));
      now--;
    });
    await w.start();
    const jobs = await Promise.all([1, 2, 3, 4, 5].map(() => client.submit("t.conc", {})));
    for (const j of jobs) assert.equal((await client.wait(j.id, { timeoutMs: 5000 })).status, "succeeded");
    await w.stop();
    assert.equal(peak, 2);
  });

  test("two lease calls go out together and never ask for more than the free slots", async () => {
    fake.leasing.delayMs = 50; // each answer waits, as for a claim's commit
    fake.leasing.mostAsked = fake.leasing.mostCalls = 0;
    try {
      const w = newWorker({ concurrency: 4 });
      let now = 0;
      let peak = 0;
      w.handle("t.pipelined", async (job) => {
        peak = Math.max(peak, ++now);
        await new Promise((r) => setTimeout(r, 10 * (job.input.n % 3)));
        now--;
        return job.input.n;
      });
      await w.start();
      const jobs = await Promise.all([...Array(40).keys()].map((n) => client.submit("t.pipelined", { n })));
      for (const [n, j] of jobs.entries()) assert.equal((await client.wait(j.id, { timeoutMs: 20000 })).output, n);
      await w.stop();
      assert.equal(fake.leasing.mostCalls, 2, "slots freed during a lease call waited for it");
      assert.ok(fake.leasing.mostAsked <= 4, `lease calls together asked for ${fake.leasing.mostAsked} slots`);
      assert.ok(peak <= 4);
    } finally {
      fake.leasing.delayMs = 0;
    }
  });

  test("a lost lease drops the job without crashing the worker", async () => {
    const logger = memoryLogger();
    const w = newWorker({ logger });
    let release;
    const gate = new Promise((r) => (release = r));
    let lostSeen;
    w.handle("t.lost", async (job) => {
      if (job.attempt > 1) return "second";
      await gate;
      try {
        await job.progress({ percent: 1 });
      } catch (e) {
        lostSeen = e;
        throw e;
      }
      return "first";
    });
    await w.start();
    const sub = await client.submit("t.lost", {});
    await until(() => fake.jobs.get(sub.id).status === "running");
    // Steal the lease: the token the worker holds no longer names the attempt.
    fake.jobs.get(sub.id).lease.token = "stolen";
    release();
    await until(() => lostSeen, { what: "LeaseLostError in the handler" });
    assert.ok(lostSeen instanceof LeaseLostError);
    // The worker keeps going: the reaper re-runs the job and the same worker takes it.
    const job = await client.wait(sub.id, { timeoutMs: 5000 });
    await w.stop();
    assert.equal(job.status, "succeeded");
    assert.equal(job.output, "second");
    assert.ok(logger.lines.some((l) => /lease lost|refused/.test(l.msg)));
  });

  test("stop() lets a running handler finish within the grace period", async () => {
    const w = newWorker({ graceMs: 3000 });
    let started;
    const running = new Promise((r) => (started = r));
    w.handle("t.grace", async () => {
      started();
      await new Promise((r) => setTimeout(r, 400));
      return "finished";
    });
    await w.start();
    const sub = await client.submit("t.grace", {});
    await running;
    await w.stop();
    const after = await client.submit("t.grace", {});
    const job = await client.get(sub.id);
    assert.equal(job.status, "succeeded");
    assert.equal(job.output, "finished");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal((await client.get(after.id)).status, "queued", "a stopped worker leases nothing");
  });

  test("stop() releases a handler still running after the grace period", async () => {
    const w = newWorker({ graceMs: 200 });
    let started;
    let reason;
    const running = new Promise((r) => (started = r));
    w.handle("t.release", async (job) => {
      started();
      await new Promise((_, reject) =>
        job.signal.addEventListener("abort", () => reject((reason = job.signal.reason))),
      );
    });
    await w.start();
    const sub = await client.submit("t.release", {});
    await running;
    const t0 = Date.now();
    await w.stop();
    assert.ok(Date.now() - t0 < 2000);
    assert.ok(reason instanceof ShutdownError);
    const job = await client.get(sub.id);
    assert.equal(job.status, "queued");
    assert.equal(fake.events(sub.id).at(-1).data.reason, "released");
    assert.equal(job.max_attempts - job.attempt, 3, "a release uses up no attempt");
  });

  test("an output the kind's output_schema refuses fails the job without retry", async () => {
    const w = newWorker();
    w.handle("t.out", async () => ({ nope: 1 }), { outputSchema: { type: "object", required: ["url"] } });
    await w.start();
    const sub = await client.submit("t.out", {});
    const job = await client.wait(sub.id, { timeoutMs: 5000 });
    await w.stop();
    assert.equal(job.status, "failed");
    assert.equal(job.error.type, "invalid_output");
  });
});
