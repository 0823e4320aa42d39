// Workers that die or stop, against a running Capibara server (visibility timeout 3 s in the
// test stack): a SIGKILLed worker's job runs again; a stale lease is refused and records
// nothing; SIGTERM stops leasing, lets the running handler finish within the grace period or
// releases it. Skipped when CAPIBARA_URL is unset.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Client, Lease, LeaseLostError, ValidationError, Worker } from "../src/index.js";
import { SERVER, memoryLogger, needsServer, spawnWorker, uniqueKind, until } from "../testing/helpers.js";

const FAST_RETRY = { initial_ms: 100, factor: 2, max_ms: 1000 };

describe("worker processes (real server)", { ...needsServer, concurrency: true }, () => {
  const client = SERVER && new Client(SERVER);
  const env = (kind, more = {}) => ({
    CAPIBARA_URL: SERVER.url,
    CAPIBARA_API_KEY: SERVER.apiKey,
    KIND: kind,
    ...more,
  });

  /** An in-process worker that runs `kind` like the child does (sleep_ms, slow_attempts). */
  async function helper(kind) {
    const w = new Worker({ client, logger: memoryLogger(), name: "sdk-ts-helper" });
    w.handle(kind, async (job) => {
      const slow = job.input.slow_attempts ?? Infinity;
      if (job.attempt <= slow) await new Promise((r) => setTimeout(r, job.input.sleep_ms ?? 0));
      return { pid: process.pid, attempt: job.attempt };
    });
    await w.start();
    return w;
  }

  test("a SIGKILLed worker's job runs again on another worker (attempt 2 succeeds)", async () => {
    const kind = uniqueKind();
    await client.putKind(kind, {});
    const w1 = spawnWorker(env(kind));
    let w2;
    try {
      await w1.next((m) => m.event === "registered");
      const sub = await client.submit(kind, { sleep_ms: 60000, slow_attempts: 1 }, { backoff: FAST_RETRY });
      await w1.next((m) => m.event === "started" && m.job === sub.id);
      // Claimed 250 ms after its lease (no report came first): a job with a lease to lose.
      await until(async () => (await client.get(sub.id)).status === "running", { what: "its claim" });
      w1.child.kill("SIGKILL");
      assert.equal((await w1.exited).signal, "SIGKILL");

      w2 = spawnWorker(env(kind));
      const job = await client.wait(sub.id, { timeoutMs: 25000 });
      assert.equal(job.status, "succeeded");
      assert.equal(job.attempt, 2);
      assert.equal(job.output.pid, w2.child.pid);
      const lost = (await client.allEvents(sub.id)).filter((e) => e.type === "JobAttemptFailed");
      assert.equal(lost.length, 1);
      assert.equal(lost[0].data.error.type, "worker_lost");
    } finally {
      w1.child.kill("SIGKILL");
      if (w2) {
        w2.child.kill("SIGTERM");
        await w2.exited;
      }
    }
  });

  test("a stale lease is refused with LeaseLostError and records nothing", async () => {
    const kind = uniqueKind();
    await client.putKind(kind, {});
    const reg1 = await client.registerWorker({ kinds: [kind], name: "sdk-ts-stale-1" });
    const sub = await client.submit(kind, { n: 1 }, { backoff: FAST_RETRY });
    const [old] = await client.leaseJobs(reg1.id, { maxJobs: 1, waitMs: 10000 });
    assert.equal(old.jobId, sub.id);
    assert.equal(old.job.attempt, 1);
    await old.progress({ message: "while fresh" });
    // No heartbeat: the lease expires (3 s) and the job is re-leased by another worker.
    const reg2 = await client.registerWorker({ kinds: [kind], name: "sdk-ts-stale-2" });
    let fresh;
    await until(
      async () => {
        [fresh] = await client.leaseJobs(reg2.id, { maxJobs: 1, waitMs: 5000 });
        return fresh;
      },
      { timeoutMs: 25000, what: "the job re-leased" },
    );
    assert.equal(fresh.jobId, sub.id);
    assert.equal(fresh.job.attempt, 2);

    const complete = await old.complete({ from: "stale" }).catch((e) => e);
    assert.ok(complete instanceof LeaseLostError, String(complete));
    assert.equal(complete.status, 409);
    assert.match(complete.type, /lease-lost$/);
    await assert.rejects(old.progress({ message: "stale progress" }), LeaseLostError);
    await assert.rejects(old.heartbeat(), LeaseLostError);
    await assert.rejects(old.fail({ type: "x", message: "stale fail" }), LeaseLostError);
    await assert.rejects(old.logs([{ level: "info", message: "stale log" }]), LeaseLostError);

    // A malformed token is a 422 naming the header; a token of another job is a lost lease.
    const garbage = new Lease(client, { job: fresh.job, lease: { token: "not-a-token", expires_at: "" } });
    const bad = await garbage.heartbeat().catch((e) => e);
    assert.ok(bad instanceof ValidationError, String(bad));
    assert.equal(bad.field, "Capibara-Lease");
    const other = await client.submit(kind, { n: 2 });
    const crossed = new Lease(client, { job: other, lease: { token: fresh.token, expires_at: "" } });
    await assert.rejects(crossed.complete({ from: "crossed" }), LeaseLostError);
    await client.cancel(other.id);

    const before = await client.allEvents(sub.id);
    const done = await fresh.complete({ from: "fresh" });
    assert.equal(done.status, "succeeded");
    const evs = await client.allEvents(sub.id);
    assert.deepEqual(evs.slice(0, before.length).map((e) => e.id), before.map((e) => e.id));
    const text = JSON.stringify(evs);
    for (const stale of ["stale progress", "stale fail", "stale log", '"stale"', "crossed"]) {
      assert.ok(!text.includes(stale), `the stale token recorded ${stale}`);
    }
    const succeeded = evs.filter((e) => e.type === "JobSucceeded");
    assert.equal(succeeded.length, 1);
    assert.deepEqual(succeeded[0].data.output, { from: "fresh" });
    assert.ok(evs.some((e) => e.type === "JobProgress" && e.data.message === "while fresh"));
    assert.deepEqual((await client.get(sub.id)).output, { from: "fresh" });
    await client.deregisterWorker(reg1.id);
    await client.deregisterWorker(reg2.id);
  });

  test("SIGTERM: stops leasing, the running handler finishes within the grace period", async () => {
    const kind = uniqueKind();
    await client.putKind(kind, {});
    const w = spawnWorker(env(kind, { GRACE_MS: "15000", CONCURRENCY: "2" }));
    let h;
    try {
      const { id: workerId } = await w.next((m) => m.event === "registered");
      const a = await client.submit(kind, { sleep_ms: 2000 });
      await w.next((m) => m.event === "started" && m.job === a.id);
      w.child.kill("SIGTERM");
      await w.next((m) => m.event === "stopping");
      // A free slot, but the worker is stopping: it must not take this one.
      const b = await client.submit(kind, { sleep_ms: 0 });
      const t0 = Date.now();
      const exit = await w.exited;
      assert.equal(exit.code, 0, w.stderr());
      assert.ok(Date.now() - t0 < 10000);
      assert.ok(w.messages.some((m) => m.event === "finished" && m.job === a.id));
      assert.ok(w.messages.some((m) => m.event === "stopped"));
      const ja = await client.get(a.id);
      assert.equal(ja.status, "succeeded");
      assert.equal(ja.attempt, 1);
      assert.equal(ja.output.pid, w.child.pid);
      assert.equal((await client.get(b.id)).status, "queued");
      assert.ok(!w.messages.some((m) => m.job === b.id), "the stopping worker leased a job");
      const me = (await client.listWorkers()).find((x) => x.id === workerId);
      assert.equal(me?.status, "stopped");
      // Nothing is lost: another worker runs b.
      h = await helper(kind);
      const jb = await client.wait(b.id, { timeoutMs: 20000 });
      assert.equal(jb.status, "succeeded");
      assert.equal(jb.output.pid, process.pid);
    } finally {
      w.child.kill("SIGKILL");
      await h?.stop();
    }
  });

  test("SIGTERM: a handler still running after the grace period is released, then runs again", async () => {
    const kind = uniqueKind();
    await client.putKind(kind, {});
    const w = spawnWorker(env(kind, { GRACE_MS: "500" }));
    let h;
    try {
      await w.next((m) => m.event === "registered");
      const c = await client.submit(kind, { sleep_ms: 60000, slow_attempts: 1 });
      await w.next((m) => m.event === "started" && m.job === c.id);
      const t0 = Date.now();
      w.child.kill("SIGTERM");
      const exit = await w.exited;
      assert.equal(exit.code, 0, w.stderr());
      assert.ok(Date.now() - t0 < 5000, `exited ${Date.now() - t0} ms after SIGTERM`);
      assert.ok(w.messages.some((m) => m.event === "aborted" && m.job === c.id && m.reason === "ShutdownError"));
      const jc = await client.get(c.id);
      assert.equal(jc.status, "queued");
      const evs = await client.allEvents(c.id);
      assert.ok(evs.some((e) => e.type === "JobQueued" && e.data.reason === "released"));
      // The server records the released attempt as ended by the shutdown, not as a lost worker,
      // and it does not use up an attempt: as many attempts are left as before it started.
      const ended = evs.filter((e) => e.type === "JobAttemptFailed").map((e) => e.data.error.type);
      assert.deepEqual(ended, ["worker_shutdown"]);
      assert.equal(jc.max_attempts - jc.attempt, c.max_attempts);
      h = await helper(kind);
      const done = await client.wait(c.id, { timeoutMs: 20000 });
      assert.equal(done.status, "succeeded");
      assert.equal(done.output.pid, process.pid);
    } finally {
      w.child.kill("SIGKILL");
      await h?.stop();
    }
  });
});
