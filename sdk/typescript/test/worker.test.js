// The worker against a running Capibara server: handlers by kind, progress, cancel through the
// AbortSignal, retries, fatal errors, timeouts. Skipped when CAPIBARA_URL is unset.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { CanceledError, Client, FatalError, JobTimeoutError, RetryAfterError, Worker } from "../src/index.js";
import { SERVER, memoryLogger, needsServer, uniqueKind, until } from "../testing/helpers.js";

const FAST_RETRY = { initial_ms: 100, factor: 2, max_ms: 1000 };

describe("worker (real server)", needsServer, () => {
  const client = SERVER && new Client(SERVER);

  /** A started worker running `handlers` ({kind: [fn, opts]}); stop it when done. */
  async function worker(handlers, opts = {}) {
    const w = new Worker({ client, logger: memoryLogger(), name: "sdk-ts-test", ...opts });
    for (const [kind, [fn, o]] of Object.entries(handlers)) w.handle(kind, fn, o);
    await w.start();
    return w;
  }

  test("runs jobs with progress, logs and output chunks; the output is the return value", async () => {
    const kind = uniqueKind();
    const w = await worker({
      [kind]: [
        async (job) => {
          await job.progress({ percent: 10, message: "start" });
          await job.log("working", "info");
          await job.chunk({ part: 1 });
          await job.chunk({ part: 2 });
          await job.progress({ percent: 100, message: "done", data: { k: "v" } });
          return { sum: job.input.a + job.input.b, attempt: job.attempt };
        },
        { inputSchema: { type: "object", required: ["a", "b"] }, description: "adds" },
      ],
    });
    try {
      assert.equal(w.registration.heartbeat_s, w.registration.lease_s / 3);
      const sub = await client.submit(kind, { a: 2, b: 3 });
      const job = await client.wait(sub.id, { timeoutMs: 20000 });
      assert.equal(job.status, "succeeded");
      assert.deepEqual(job.output, { sum: 5, attempt: 1 });
      assert.deepEqual(job.progress, { percent: 100, message: "done", data: { k: "v" } });
      const evs = await client.allEvents(sub.id);
      assert.deepEqual(evs.filter((e) => e.type === "JobProgress").map((e) => e.data.percent), [10, 100]);
      assert.deepEqual(evs.filter((e) => e.type === "JobLog").map((e) => e.data), [{ level: "info", message: "working" }]);
      assert.deepEqual(
        evs.filter((e) => e.type === "JobOutputChunk").map((e) => e.data),
        [{ seq: 0, data: { part: 1 } }, { seq: 1, data: { part: 2 } }],
      );
      // The kind was declared with its spec when the worker registered.
      const k = await client.getKind(kind);
      assert.equal(k.description, "adds");
      const bad = await client.submit(kind, { a: 1 }).catch((e) => e);
      assert.equal(bad.field, "input.b");
    } finally {
      await w.stop();
    }
  });

  test("a handler that throws is retried; attempt 2 succeeds", async () => {
    const kind = uniqueKind();
    const w = await worker({
      [kind]: [
        async (job) => {
          if (job.attempt === 1) throw new RangeError("first attempt fails");
          return { attempt: job.attempt };
        },
      ],
    });
    try {
      const sub = await client.submit(kind, {}, { backoff: FAST_RETRY });
      const job = await client.wait(sub.id, { timeoutMs: 20000 });
      assert.equal(job.status, "succeeded");
      assert.equal(job.attempt, 2);
      assert.deepEqual(job.output, { attempt: 2 });
      const failed = (await client.allEvents(sub.id)).filter((e) => e.type === "JobAttemptFailed");
      assert.equal(failed.length, 1);
      assert.equal(failed[0].data.error.type, "RangeError");
      assert.equal(failed[0].data.error.message, "first attempt fails");
    } finally {
      await w.stop();
    }
  });

  test("FatalError fails the job at once, without retry", async () => {
    const kind = uniqueKind();
    const w = await worker({
      [kind]: [
        async () => {
          throw new FatalError("cannot be done", { type: "bad_request" });
        },
      ],
    });
    try {
      const sub = await client.submit(kind, {}, { maxAttempts: 3, backoff: FAST_RETRY });
      const job = await client.wait(sub.id, { timeoutMs: 20000 });
      assert.equal(job.status, "failed");
      assert.equal(job.attempt, 1);
      assert.equal(job.error.type, "bad_request");
      assert.equal(job.error.message, "cannot be done");
    } finally {
      await w.stop();
    }
  });

  test("RetryAfterError retries no sooner than its delay", async () => {
    const kind = uniqueKind();
    const w = await worker({
      [kind]: [
        async (job) => {
          if (job.attempt === 1) throw new RetryAfterError(1.5, "rate limited upstream");
          return "later";
        },
      ],
    });
    try {
      const sub = await client.submit(kind, {}, { backoff: FAST_RETRY });
      const job = await client.wait(sub.id, { timeoutMs: 20000 });
      assert.equal(job.status, "succeeded");
      assert.equal(job.attempt, 2);
      const evs = await client.allEvents(sub.id);
      const failed = evs.find((e) => e.type === "JobAttemptFailed");
      assert.equal(failed.data.error.type, "retry_after");
      const started = evs.filter((e) => e.type === "JobStarted");
      const gap = Date.parse(started[1].recorded_at) - Date.parse(failed.recorded_at);
      assert.ok(gap >= 1400, `attempt 2 started ${gap} ms after the failure, expected ≥ 1500`);
    } finally {
      await w.stop();
    }
  });

  test("cancel reaches the running handler through job.signal; the job ends canceled", async () => {
    const kind = uniqueKind();
    let started;
    const running = new Promise((r) => (started = r));
    let reason;
    let abortedAt;
    const w = await worker({
      [kind]: [
        (job) =>
          new Promise((_, reject) => {
            started();
            job.signal.addEventListener("abort", () => {
              abortedAt = Date.now();
              reason = job.signal.reason;
              reject(reason);
            });
          }),
      ],
    });
    try {
      const sub = await client.submit(kind, {});
      await running;
      // Claimed 250 ms after its lease (no report came first): a running attempt to cancel.
      // (One canceled sooner is canceled at once, and its handler told its lease is lost.)
      await until(async () => (await client.get(sub.id)).status === "running", { what: "its claim" });
      const t0 = Date.now();
      const c = await client.cancel(sub.id);
      assert.equal(c.cancel_requested, true);
      const job = await client.wait(sub.id, { timeoutMs: 20000 });
      assert.equal(job.status, "canceled");
      assert.ok(reason instanceof CanceledError, String(reason));
      const hb = w.registration.heartbeat_s * 1000;
      assert.ok(abortedAt - t0 <= hb * 2 + 1000, `aborted ${abortedAt - t0} ms after cancel`);
      const types = (await client.allEvents(sub.id)).map((e) => e.type);
      assert.ok(types.includes("JobCancelRequested"));
      assert.equal(types.at(-1), "JobCanceled");
    } finally {
      await w.stop();
    }
  });

  test("timeout_s aborts the handler with JobTimeoutError and the attempt fails as timeout", async () => {
    const kind = uniqueKind();
    let reason;
    const w = await worker({
      [kind]: [
        (job) =>
          new Promise((resolve, reject) => {
            if (job.attempt > 1) return resolve("quick");
            job.signal.addEventListener("abort", () => reject((reason = job.signal.reason)));
          }),
      ],
    });
    try {
      const sub = await client.submit(kind, {}, { timeoutS: 1, backoff: FAST_RETRY });
      const job = await client.wait(sub.id, { timeoutMs: 20000 });
      assert.ok(reason instanceof JobTimeoutError, String(reason));
      assert.equal(job.status, "succeeded");
      assert.equal(job.attempt, 2);
      const failed = (await client.allEvents(sub.id)).find((e) => e.type === "JobAttemptFailed");
      assert.equal(failed.data.error.type, "timeout");
    } finally {
      await w.stop();
    }
  });

  test("a kind handled by the SDK runs as a workflow step", async () => {
    const kind = uniqueKind();
    const w = await worker({ [kind]: [async (job) => ({ doubled: job.input.n * 2 })] });
    try {
      const wf = await client.createWorkflow({
        name: `sdk-ts-${kind}`,
        steps: [{ id: "a", kind, input: { n: "{{ input.n }}" } }],
        output: "{{ steps.a.output }}",
      });
      const run = await client.startRun(wf.id, { n: 21 }, { waitS: 30 });
      const ended = run.status === "succeeded" ? run : await client.waitRun(run.id, { timeoutMs: 30000 });
      assert.equal(ended.status, "succeeded");
      assert.deepEqual(ended.output, { doubled: 42 });
      await client.deleteWorkflow(wf.id);
    } finally {
      await w.stop();
    }
  });

  test("a long job keeps its lease through heartbeats (runs past the visibility timeout)", async () => {
    const kind = uniqueKind();
    const w = await worker({
      [kind]: [
        async (job) => {
          await new Promise((r) => setTimeout(r, job.input.ms));
          return "survived";
        },
      ],
    });
    try {
      const ms = Math.round(w.registration.lease_s * 1000 * 1.7);
      const sub = await client.submit(kind, { ms });
      const job = await client.wait(sub.id, { timeoutMs: ms + 15000 });
      assert.equal(job.status, "succeeded");
      assert.equal(job.attempt, 1);
      const types = (await client.allEvents(sub.id)).map((e) => e.type);
      assert.ok(!types.includes("JobAttemptFailed"), types.join(","));
    } finally {
      await w.stop();
    }
  });
});
