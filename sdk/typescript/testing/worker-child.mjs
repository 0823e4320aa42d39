// A worker process for the tests that kill or stop one (SIGKILL, SIGTERM). Configured by the
// environment: CAPIBARA_URL, CAPIBARA_API_KEY, KIND, GRACE_MS, CONCURRENCY. Each job's input
// says what to do: `sleep_ms` (honouring the job's signal), only in the first `slow_attempts`
// attempts when given. Prints one JSON line per step: {"event": "registered", "id"},
// {"event": "started", "job", "attempt"}, {"event": "finished", "job"}, {"event": "aborted",
// "job", "reason"}, {"event": "stopping"} (on SIGTERM), {"event": "stopped"}.

import { Client, Worker } from "../src/index.js";

const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

const worker = new Worker({
  client: new Client(),
  concurrency: Number(process.env.CONCURRENCY ?? 1),
  graceMs: Number(process.env.GRACE_MS ?? 30000),
  name: `sdk-ts-child-${process.pid}`,
});

worker.handle(process.env.KIND, async (job) => {
  say({ event: "started", job: job.id, attempt: job.attempt });
  const slow = job.input?.slow_attempts ?? Infinity;
  const ms = job.attempt <= slow ? (job.input?.sleep_ms ?? 0) : 0;
  await new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    job.signal.addEventListener("abort", () => {
      clearTimeout(t);
      say({ event: "aborted", job: job.id, reason: job.signal.reason?.name });
      reject(job.signal.reason);
    });
  });
  say({ event: "finished", job: job.id });
  return { pid: process.pid, attempt: job.attempt };
});

const done = worker.run();
worker.start().then((r) => {
  say({ event: "registered", id: r.id });
  process.on("SIGTERM", () => say({ event: "stopping" }));
});
await done;
say({ event: "stopped" });
