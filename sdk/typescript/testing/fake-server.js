// An in-memory stand-in for the parts of the Capibara API that the SDK's worker and client
// use (jobs, events with SSE, kinds, the worker protocol with leases and fencing), for unit
// tests that run without the real server. It follows docs/api.md and docs/workers.md, but is
// not the server: the suites under test/ that need the real binaries read CAPIBARA_URL.

import http from "node:http";
import { randomUUID } from "node:crypto";

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

export async function startFakeServer({ leaseS = 3, backoffMs = 100 } = {}) {
  const jobs = new Map();
  const kinds = new Map();
  const workers = new Map();
  // Lease calls: `delayMs` holds each answer (as a claim's commit would); `asked` holds the
  // max_jobs of the calls in flight; `mostAsked` / `mostCalls` the most seen together.
  const leasing = { delayMs: 0, asked: [], mostAsked: 0, mostCalls: 0 };
  const log = []; // every event, in order
  let nextEvent = 1;
  const waiters = new Set();
  const requests = []; // `${method} ${path}` of every request, for assertions
  const batches = []; // the size of each batch of completions

  function notify() {
    for (const w of [...waiters]) w();
  }
  function changed() {
    return new Promise((r) => {
      const w = () => {
        waiters.delete(w);
        r();
      };
      waiters.add(w);
      setTimeout(w, 50);
    });
  }
  function append(job, type, data = {}) {
    const ev = {
      id: String(nextEvent++),
      stream_type: "job",
      stream_id: job.id,
      version: job.events.length + 1,
      type,
      data,
      metadata: { kind: job.kind },
      recorded_at: new Date().toISOString(),
    };
    job.events.push(ev);
    log.push(ev);
    notify();
  }
  function view(job) {
    const { events, lease, ...rest } = job;
    return rest;
  }
  function retryOrFail(job, error, retryAfterS) {
    if (job.attempt < job.max_attempts) {
      const at = Date.now() + (retryAfterS != null ? retryAfterS * 1000 : backoffMs);
      append(job, "JobAttemptFailed", { attempt: job.attempt, error, retry_at: new Date(at).toISOString() });
      job.status = "scheduled";
      job.run_at = at;
      append(job, "JobScheduled", { run_at: new Date(at).toISOString(), reason: "retry" });
    } else {
      append(job, "JobAttemptFailed", { attempt: job.attempt, error });
      job.status = "failed";
      job.error = error;
      append(job, "JobFailed", { attempt: job.attempt, error });
    }
    job.lease = null;
  }

  // The reaper: expired leases fail the attempt with worker_lost.
  const reaper = setInterval(() => {
    const now = Date.now();
    for (const job of jobs.values()) {
      if (job.status === "running" && job.lease && job.lease.expires < now) {
        retryOrFail(job, { type: "worker_lost", message: "lease expired" });
      }
      if (job.status === "scheduled" && job.run_at <= now) {
        job.status = "queued";
        append(job, "JobQueued", { reason: "due" });
      }
    }
  }, 50);

  function problem(res, status, slug, detail, field) {
    const body = { type: `urn:capibara:problem:${slug}`, title: http.STATUS_CODES[status], status, detail };
    if (field) body.errors = [{ field, message: detail }];
    res.writeHead(status, { "content-type": "application/problem+json" });
    res.end(JSON.stringify(body));
  }
  function json(res, status, body) {
    if (body === undefined) {
      res.writeHead(status);
      return res.end();
    }
    res.writeHead(status, { "content-type": "application/json" });
    res.end(JSON.stringify(body));
  }
  async function readJson(req) {
    let s = "";
    for await (const c of req) s += c;
    return s ? JSON.parse(s) : {};
  }
  function leased(req, res, job) {
    const token = req.headers["capibara-lease"];
    if (!token) return problem(res, 422, "validation", "missing", "Capibara-Lease"), null;
    if (!job.lease || job.lease.token !== token || job.status !== "running") {
      return problem(res, 409, "lease-lost", "the lease is no longer this attempt's"), null;
    }
    return job.lease;
  }

  // The output field the kind's schema requires and `output` lacks, if any.
  function missingOutput(job, output) {
    for (const f of kinds.get(job.kind)?.output_schema?.required ?? []) {
      if (!(output && f in output)) return `output.${f}`;
    }
    return null;
  }
  function succeed(job, output) {
    job.status = "succeeded";
    job.output = output ?? null;
    job.lease = null;
    append(job, "JobSucceeded", { attempt: job.attempt, output: job.output });
  }
  function problemBody(status, slug, detail, field) {
    const body = { type: `urn:capibara:problem:${slug}`, title: http.STATUS_CODES[status], status, detail };
    if (field) body.errors = [{ field, message: detail }];
    return body;
  }

  async function handle(req, res) {
    const url = new URL(req.url, "http://x");
    const path = url.pathname;
    const method = req.method;
    requests.push(`${method} ${path}`);
    let m;
    if (!req.headers.authorization) return problem(res, 401, "unauthorized", "missing key");

    if ((m = path.match(/^\/v1\/kinds\/([^/]+)$/))) {
      if (method === "PUT") {
        const spec = await readJson(req);
        const existed = kinds.has(m[1]);
        kinds.set(m[1], { name: m[1], builtin: false, ...spec });
        return json(res, existed ? 200 : 201, kinds.get(m[1]));
      }
      if (method === "GET") {
        return kinds.has(m[1]) ? json(res, 200, kinds.get(m[1])) : problem(res, 404, "not-found", "no kind");
      }
      if (method === "DELETE") {
        kinds.delete(m[1]);
        return json(res, 204);
      }
    }
    if (path === "/v1/kinds" && method === "GET") return json(res, 200, { items: [...kinds.values()] });

    if (path === "/v1/workers" && method === "POST") {
      const body = await readJson(req);
      const names = [];
      for (const k of body.kinds ?? []) {
        if (typeof k === "string") {
          if (!kinds.has(k)) kinds.set(k, { name: k, builtin: false });
          names.push(k);
        } else {
          const { name, ...spec } = k;
          kinds.set(name, { name, builtin: false, ...spec });
          names.push(name);
        }
      }
      const w = { id: randomUUID(), name: body.name ?? "w", kinds: names, status: "active", body };
      workers.set(w.id, w);
      return json(res, 201, { id: w.id, name: w.name, lease_s: leaseS, heartbeat_s: leaseS / 3, kinds: names, queues: ["default"] });
    }
    if (path === "/v1/workers" && method === "GET") {
      return json(res, 200, { items: [...workers.values()].map(({ body, ...w }) => w), next_cursor: null });
    }
    if ((m = path.match(/^\/v1\/workers\/([^/]+)$/)) && method === "DELETE") {
      const w = workers.get(m[1]);
      if (!w) return problem(res, 404, "not-found", "no worker");
      w.status = "stopped";
      return json(res, 204);
    }
    if ((m = path.match(/^\/v1\/workers\/([^/]+)\/complete$/)) && method === "POST") {
      const body = await readJson(req);
      batches.push(body.jobs.length);
      const results = body.jobs.map((c, i) => {
        const job = jobs.get(c.id);
        if (!job?.lease || job.lease.token !== c.lease || job.status !== "running") {
          return { id: c.id, status: 409, problem: problemBody(409, "lease-lost", "the lease is no longer this attempt's") };
        }
        const missing = missingOutput(job, c.output);
        if (missing) return { id: c.id, status: 422, problem: problemBody(422, "validation", "missing", `jobs[${i}].${missing}`) };
        succeed(job, c.output);
        return { id: c.id, status: 200 };
      });
      notify();
      return json(res, 200, { results });
    }
    if ((m = path.match(/^\/v1\/workers\/([^/]+)\/lease$/)) && method === "POST") {
      const w = workers.get(m[1]);
      if (!w) return problem(res, 404, "not-found", "no worker");
      const body = await readJson(req);
      const deadline = Date.now() + (body.wait_ms ?? 30000);
      const asked = body.max_jobs ?? 1;
      leasing.asked.push(asked);
      leasing.mostAsked = Math.max(leasing.mostAsked, leasing.asked.reduce((a, b) => a + b, 0));
      leasing.mostCalls = Math.max(leasing.mostCalls, leasing.asked.length);
      let inFlight = true;
      const done = () => {
        if (inFlight) leasing.asked.splice(leasing.asked.indexOf(asked), 1);
        inFlight = false;
      };
      let closed = false;
      res.on("close", () => {
        closed = true;
        done();
      });
      const answer = async (status, body) => {
        if (leasing.delayMs) await new Promise((r) => setTimeout(r, leasing.delayMs));
        done();
        return json(res, status, body);
      };
      for (;;) {
        if (closed) return;
        const out = [];
        for (const job of jobs.values()) {
          if (out.length >= (body.max_jobs ?? 1)) break;
          if (job.status !== "queued" || !w.kinds.includes(job.kind)) continue;
          job.attempt++;
          job.status = "running";
          job.started_at = new Date().toISOString();
          job.worker_id = w.id;
          job.lease = { token: `${job.id}.${job.attempt}.${randomUUID()}`, expires: Date.now() + leaseS * 1000 };
          append(job, "JobStarted", { attempt: job.attempt, worker: w.id });
          out.push({ job: view(job), lease: { token: job.lease.token, expires_at: new Date(job.lease.expires).toISOString() } });
        }
        if (out.length || Date.now() >= deadline) return answer(200, { jobs: out });
        await changed();
      }
    }

    if (path === "/v1/jobs" && method === "POST") {
      const body = await readJson(req);
      const kind = kinds.get(body.kind);
      if (!kind) return problem(res, 422, "validation", `unknown kind ${body.kind}`, "kind");
      const job = {
        id: randomUUID(),
        kind: body.kind,
        queue: body.queue ?? "default",
        status: "queued",
        input: body.input ?? {},
        output: null,
        error: null,
        progress: null,
        attempt: 0,
        max_attempts: body.max_attempts ?? kind.max_attempts ?? 3,
        timeout_s: body.timeout_s ?? kind.timeout_s ?? null,
        cancel_requested: false,
        tags: body.tags ?? {},
        events: [],
        lease: null,
      };
      jobs.set(job.id, job);
      append(job, "JobSubmitted", body);
      append(job, "JobQueued", { reason: "due" });
      return json(res, 202, view(job));
    }
    if ((m = path.match(/^\/v1\/jobs\/([^/]+)(?:\/([a-z]+))?$/))) {
      const job = jobs.get(m[1]);
      if (!job) return problem(res, 404, "not-found", `no job \`${m[1]}\``);
      const action = m[2];
      if (!action && method === "GET") {
        const wait = /wait=(\d+(?:\.\d+)?)/.exec(req.headers.prefer ?? "");
        if (wait) {
          const deadline = Date.now() + Number(wait[1]) * 1000;
          while (!TERMINAL.has(job.status) && Date.now() < deadline) await changed();
          return json(res, TERMINAL.has(job.status) ? 200 : 202, view(job));
        }
        return json(res, 200, view(job));
      }
      if (action === "events" && method === "GET") {
        let after = Number(req.headers["last-event-id"] ?? url.searchParams.get("after") ?? 0);
        if ((req.headers.accept ?? "").includes("text/event-stream")) {
          res.writeHead(200, { "content-type": "text/event-stream" });
          let closed = false;
          res.on("close", () => (closed = true));
          for (;;) {
            const batch = job.events.filter((e) => Number(e.id) > after);
            for (const e of batch) {
              res.write(`id: ${e.id}\nevent: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`);
              after = Number(e.id);
            }
            if (TERMINAL.has(job.status) && job.events.every((e) => Number(e.id) <= after)) return res.end();
            await changed();
            if (closed) return;
          }
        }
        const limit = Number(url.searchParams.get("limit") ?? 50);
        const items = job.events.filter((e) => Number(e.id) > after).slice(0, limit);
        return json(res, 200, { items, next_cursor: items.length === limit ? items.at(-1).id : null });
      }
      if (action === "cancel" && method === "POST") {
        if (TERMINAL.has(job.status)) return problem(res, 409, "conflict", "already finished");
        if (job.status === "running") {
          job.cancel_requested = true;
          append(job, "JobCancelRequested", {});
          return json(res, 202, view(job));
        }
        job.status = "canceled";
        append(job, "JobCanceled", {});
        return json(res, 200, view(job));
      }
      if (method === "POST" && ["heartbeat", "progress", "logs", "chunks", "complete", "fail", "release"].includes(action)) {
        const lease = leased(req, res, job);
        if (!lease) return;
        const body = await readJson(req);
        switch (action) {
          case "heartbeat":
            lease.expires = Date.now() + leaseS * 1000;
            return json(res, 200, { cancel_requested: job.cancel_requested, expires_at: new Date(lease.expires).toISOString() });
          case "progress":
            job.progress = body;
            append(job, "JobProgress", body);
            return json(res, 204);
          case "logs":
            for (const l of body.lines) append(job, "JobLog", l);
            return json(res, 204);
          case "chunks":
            append(job, "JobOutputChunk", body);
            return json(res, 204);
          case "complete": {
            const missing = missingOutput(job, body.output);
            if (missing) return problem(res, 422, "validation", "missing", missing);
            succeed(job, body.output);
            return json(res, 200, view(job));
          }
          case "fail":
            if (body.retryable === false) {
              append(job, "JobAttemptFailed", { attempt: job.attempt, error: body.error });
              job.lease = null;
              if (job.cancel_requested) {
                job.status = "canceled";
                append(job, "JobCanceled", { attempt: job.attempt });
              } else {
                job.status = "failed";
                job.error = body.error;
                append(job, "JobFailed", { attempt: job.attempt, error: body.error });
              }
            } else {
              retryOrFail(job, body.error, body.retry_after_s);
            }
            return json(res, 200, view(job));
          case "release":
            // As the server does: the attempt ends, and the budget grows by one.
            append(job, "JobAttemptFailed", {
              attempt: job.attempt,
              error: { type: "worker_shutdown", message: "the worker stopped before the attempt finished" },
            });
            job.status = "queued";
            job.lease = null;
            job.max_attempts++;
            append(job, "JobQueued", { reason: "released", max_attempts: job.max_attempts });
            return json(res, 200, view(job));
        }
      }
    }
    return problem(res, 404, "not-found", `no route ${method} ${path}`);
  }

  const server = http.createServer((req, res) => {
    handle(req, res).catch((err) => {
      if (!res.headersSent) problem(res, 500, "internal", String(err));
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const url = `http://127.0.0.1:${server.address().port}`;
  return {
    url,
    apiKey: "fake-key",
    jobs,
    workers,
    leasing,
    requests,
    batches,
    events: (id) => jobs.get(id).events,
    async close() {
      clearInterval(reaper);
      server.closeAllConnections?.();
      await new Promise((r) => server.close(r));
    },
  };
}
