// The client against a running Capibara server (CAPIBARA_URL, CAPIBARA_API_KEY: an admin key of
// namespace `default`): submit and wait, idempotency, batches, typed errors, SSE with resume,
// kinds, workflows, schedules. Skipped when CAPIBARA_URL is unset.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";

import {
  Client,
  ConflictError,
  LeaseLostError,
  NotFoundError,
  UnauthorizedError,
  ValidationError,
  WaitTimeoutError,
  Worker,
} from "../src/index.js";
import { SERVER, memoryLogger, needsServer, uniqueKind } from "../testing/helpers.js";

describe("client (real server)", needsServer, () => {
  const client = SERVER && new Client(SERVER);

  test("submit with Prefer: wait answers the finished job; wait() follows a longer one", async () => {
    const done = await client.submit("echo", { hello: "world" }, { waitS: 20, tags: { sdk: "ts" } });
    assert.equal(done.status, "succeeded");
    assert.deepEqual(done.output, { hello: "world" });
    assert.deepEqual(done.tags, { sdk: "ts" });

    const slow = await client.submit("sleep", { ms: 1500 });
    assert.equal(slow.status, "queued");
    const t0 = Date.now();
    const finished = await client.wait(slow.id, { timeoutMs: 20000 });
    assert.equal(finished.status, "succeeded");
    assert.ok(Date.now() - t0 >= 1000, "wait returned before the job could have ended");
    assert.equal((await client.get(slow.id)).status, "succeeded");
  });

  test("wait() gives up after timeoutMs with WaitTimeoutError holding the job", async () => {
    const job = await client.submit("sleep", { ms: 4000 });
    const t0 = Date.now();
    const err = await client.wait(job.id, { timeoutMs: 1200 }).catch((e) => e);
    assert.ok(err instanceof WaitTimeoutError, String(err));
    assert.equal(err.job.id, job.id);
    assert.ok(!["succeeded", "failed", "canceled"].includes(err.job.status));
    assert.ok(Date.now() - t0 < 3500);
    await client.cancel(job.id);
  });

  test("Idempotency-Key replays the same job; a different body is a ValidationError", async () => {
    const key = randomUUID();
    const a = await client.submit("echo", { n: 1 }, { idempotencyKey: key });
    const b = await client.submit("echo", { n: 1 }, { idempotencyKey: key });
    assert.equal(a.id, b.id);
    const err = await client.submit("echo", { n: 2 }, { idempotencyKey: key }).catch((e) => e);
    assert.ok(err instanceof ValidationError, String(err));
    assert.equal(err.field, "Idempotency-Key");
  });

  test("submitBatch answers the jobs in order; a bad one names its index and stores none", async () => {
    const items = await client.submitBatch([
      { kind: "echo", input: { n: 1 } },
      { kind: "echo", input: { n: 2 }, priority: "high" },
    ]);
    assert.equal(items.length, 2);
    assert.deepEqual(items.map((j) => j.input.n), [1, 2]);
    assert.equal(items[1].priority, "high");
    const err = await client
      .submitBatch([{ kind: "echo", input: {} }, { kind: "no-such-kind-" + Date.now(), input: {} }])
      .catch((e) => e);
    assert.ok(err instanceof ValidationError, String(err));
    assert.equal(err.field, "jobs[1].kind");
    assert.equal(err.status, 422);
  });

  test("typed errors: 404, 401, 409 (not a lost lease)", async () => {
    await assert.rejects(client.get(randomUUID()), NotFoundError);
    const anon = new Client({ url: SERVER.url, apiKey: "cap_not_a_real_key_" + Date.now() });
    const err = await anon.get(randomUUID()).catch((e) => e);
    assert.ok(err instanceof UnauthorizedError, String(err));
    assert.equal(err.status, 401);
    const job = await client.submit("echo", {}, { waitS: 20 });
    assert.equal(job.status, "succeeded");
    const c = await client.cancel(job.id).catch((e) => e);
    assert.ok(c instanceof ConflictError && !(c instanceof LeaseLostError), String(c));
    assert.match(c.type, /conflict$/);
  });

  test("retry() queues a failed job again", async () => {
    const job = await client.submit("fail", { message: "nope" }, { maxAttempts: 1, waitS: 20 });
    assert.equal(job.status, "failed");
    const again = await client.retry(job.id);
    assert.ok(["queued", "running", "failed"].includes(again.status));
    const page = await client.events(job.id, { limit: 500 });
    assert.ok(page.items.some((e) => e.type === "JobQueued" && e.data.reason === "manual_retry"));
  });

  describe("kinds", () => {
    const kind = uniqueKind();
    after(() => client.deleteKind(kind).catch(() => {}));

    test("putKind, listKinds, a 422 naming the input field, deleteKind", async () => {
      const created = await client.putKind(kind, {
        description: "from the TypeScript SDK tests",
        input_schema: {
          type: "object",
          required: ["width"],
          properties: { width: { type: "integer", minimum: 1 } },
        },
        max_attempts: 2,
      });
      assert.equal(created.name, kind);
      const listed = (await client.listKinds()).find((k) => k.name === kind);
      assert.ok(listed, "listKinds shows the new kind");
      assert.equal(listed.builtin, false);
      assert.equal((await client.getKind(kind)).name, kind);

      const err = await client.submit(kind, { width: 0 }).catch((e) => e);
      assert.ok(err instanceof ValidationError, String(err));
      assert.equal(err.field, "input.width");
      const ok = await client.submit(kind, { width: 3 });
      assert.equal(ok.max_attempts, 2);
      await client.cancel(ok.id);

      await client.deleteKind(kind);
      const gone = await client.submit(kind, { width: 3 }).catch((e) => e);
      assert.ok(gone instanceof ValidationError, String(gone));
      assert.equal(gone.field, "kind");
    });
  });

  describe("events", () => {
    const kind = uniqueKind();
    let worker;
    let gate;
    let open;
    before(async () => {
      gate = new Promise((r) => (open = r));
      worker = new Worker({ client, concurrency: 4, logger: memoryLogger() });
      worker.handle(kind, async (job) => {
        await gate;
        for (let i = 1; i <= 5; i++) {
          await job.progress({ percent: i * 20, message: `step ${i}` });
          await new Promise((r) => setTimeout(r, 50));
        }
        return { steps: 5 };
      });
      await worker.start();
    });
    after(() => worker.stop());

    test("stream() follows live events and resumes with Last-Event-ID: no gap, no duplicate", async () => {
      const job = await client.submit(kind, { x: 1 });
      const first = [];
      for await (const ev of client.stream(job.id)) {
        first.push(ev);
        if (first.length === 1) open(); // the job runs only once we are streaming
        if (first.length === 4) break; // drops the connection mid-stream
      }
      const rest = [];
      for await (const ev of client.stream(job.id, { lastEventId: first.at(-1).id })) rest.push(ev);
      const streamed = [...first, ...rest];
      const all = await client.allEvents(job.id);
      assert.deepEqual(streamed.map((e) => e.id), all.map((e) => e.id));
      assert.equal(new Set(streamed.map((e) => e.id)).size, streamed.length);
      assert.equal(streamed.at(-1).type, "JobSucceeded");
      assert.deepEqual(
        streamed.filter((e) => e.type === "JobProgress").map((e) => e.data.percent),
        [20, 40, 60, 80, 100],
      );
      // The stream ended by itself after the terminal event.
      assert.equal((await client.get(job.id)).status, "succeeded");
    });

    /** Follow the firehose with `filters` until our job's JobSucceeded; the events seen. */
    async function firehose(filters, job) {
      const ctrl = new AbortController();
      const timer = setTimeout(() => ctrl.abort(), 20000);
      const seen = [];
      try {
        for await (const ev of client.streamAll({ ...filters, lastEventId: "0", signal: ctrl.signal })) {
          seen.push(ev);
          if (ev.type === "JobSucceeded" && ev.stream_id === job.id) break;
        }
      } finally {
        clearTimeout(timer);
      }
      return seen;
    }

    test("streamAll() follows the firehose with filters (tag, types)", async () => {
      const tag = `sdk:${kind}`;
      const job = await client.submit(kind, { x: 2 }, { tags: { sdk: kind } });
      const seen = await firehose({ tag, types: ["JobStarted", "JobSucceeded"] }, job);
      assert.deepEqual(seen.map((e) => [e.stream_id, e.type]), [
        [job.id, "JobStarted"],
        [job.id, "JobSucceeded"],
      ]);
    });

    test("streamAll() filters by a user kind", async () => {
      const job = await client.submit(kind, { x: 3 });
      const seen = await firehose({ kind, types: ["JobSucceeded"] }, job);
      assert.ok(seen.length >= 1);
      assert.ok(seen.every((e) => e.metadata.kind === kind && e.type === "JobSucceeded"));
    });

    test("events() pages with after and limit", async () => {
      const job = await client.submit("echo", { p: 1 }, { waitS: 20 });
      const all = await client.allEvents(job.id);
      assert.ok(all.length >= 3);
      const page1 = await client.events(job.id, { limit: 1 });
      assert.equal(page1.items.length, 1);
      assert.equal(page1.items[0].id, all[0].id);
      const page2 = await client.events(job.id, { after: page1.next_cursor, limit: 500 });
      assert.deepEqual(page2.items.map((e) => e.id), all.slice(1).map((e) => e.id));
    });
  });

  test("workflows: createWorkflow, startRun with waitS, getRun", async () => {
    const wf = await client.createWorkflow({
      name: `sdk-ts-${randomUUID().slice(0, 8)}`,
      steps: [
        { id: "a", kind: "echo", input: { n: "{{ input.n }}" } },
        { id: "b", kind: "echo", depends_on: ["a"], input: { twice: "{{ steps.a.output.n * 2 }}" } },
      ],
      output: "{{ steps.b.output }}",
    });
    assert.ok(wf.id);
    const run = await client.startRun(wf.id, { n: 21 }, { waitS: 30 });
    const ended = run.status === "succeeded" ? run : await client.waitRun(run.id, { timeoutMs: 30000 });
    assert.equal(ended.status, "succeeded");
    assert.deepEqual(ended.output, { twice: 42 });
    const again = await client.getRun(run.id);
    assert.equal(again.id, run.id);
    assert.equal(again.status, "succeeded");
    await client.deleteWorkflow(wf.id);
  });

  test("schedules: createSchedule, listSchedules, deleteSchedule", async () => {
    const s = await client.createSchedule({
      name: `sdk-ts-${randomUUID().slice(0, 8)}`,
      cron: "0 0 1 1 *",
      target: { type: "job", job: { kind: "echo", input: { from: "schedule" } } },
    });
    assert.ok(s.id);
    assert.equal(s.next_fire_times.length, 5);
    let found = false;
    let cursor;
    do {
      const page = await client.listSchedules({ limit: 500, cursor });
      found ||= page.items.some((x) => x.id === s.id);
      cursor = page.next_cursor;
    } while (!found && cursor);
    assert.ok(found, "listSchedules shows the new schedule");
    await client.deleteSchedule(s.id);
    await assert.rejects(client.getSchedule(s.id), NotFoundError);
    const bad = await client.createSchedule({ name: "x", cron: "not cron", target: { type: "job", job: { kind: "echo" } } }).catch((e) => e);
    assert.ok(bad instanceof ValidationError, String(bad));
    assert.equal(bad.field, "cron");
  });
});
