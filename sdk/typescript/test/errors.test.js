// Problem JSON → typed errors, and the transport's retry rules, against a local HTTP server.
// No Capibara server needed.

import assert from "node:assert/strict";
import http from "node:http";
import { describe, test } from "node:test";

import {
  CapibaraError,
  Client,
  ConflictError,
  ForbiddenError,
  LeaseLostError,
  NetworkError,
  NotFoundError,
  ProblemError,
  RateLimitedError,
  UnauthorizedError,
  UnavailableError,
  ValidationError,
  errorFromResponse,
} from "../src/index.js";

const problem = (status, slug, detail, errors) => ({
  type: `urn:capibara:problem:${slug}`,
  title: "T",
  status,
  detail,
  ...(errors ? { errors } : {}),
});

describe("errorFromResponse", () => {
  test("maps each status to its class, keeping the problem's members", () => {
    const cases = [
      [400, "bad-request", ValidationError],
      [401, "unauthorized", UnauthorizedError],
      [403, "forbidden", ForbiddenError],
      [404, "not-found", NotFoundError],
      [409, "conflict", ConflictError],
      [422, "validation", ValidationError],
      [429, "rate-limited", RateLimitedError],
      [503, "unavailable", UnavailableError],
      [500, "internal", ProblemError],
    ];
    for (const [status, slug, cls] of cases) {
      const e = errorFromResponse(status, problem(status, slug, "why"), new Headers());
      assert.ok(e instanceof cls, `${status} → ${cls.name}`);
      assert.ok(e instanceof ProblemError && e instanceof CapibaraError && e instanceof Error);
      assert.equal(e.status, status);
      assert.equal(e.type, `urn:capibara:problem:${slug}`);
      assert.equal(e.detail, "why");
      assert.equal(e.name, cls.name);
    }
  });

  test("a 409 whose type ends in lease-lost is a LeaseLostError, itself a ConflictError", () => {
    const e = errorFromResponse(409, problem(409, "lease-lost", "stale"), new Headers());
    assert.ok(e instanceof LeaseLostError);
    assert.ok(e instanceof ConflictError);
    const plain = errorFromResponse(409, problem(409, "conflict", "finished"), new Headers());
    assert.ok(!(plain instanceof LeaseLostError));
  });

  test("ValidationError names the field; RateLimitedError reads Retry-After", () => {
    const v = errorFromResponse(
      422,
      problem(422, "validation", "input.width: must be ≥ 1", [{ field: "input.width", message: "must be ≥ 1" }]),
      new Headers(),
    );
    assert.equal(v.field, "input.width");
    assert.equal(v.errors.length, 1);
    assert.match(v.message, /422.*input\.width/);
    const r = errorFromResponse(429, problem(429, "rate-limited", "slow down"), new Headers({ "retry-after": "5" }));
    assert.equal(r.retryAfter, 5);
  });

  test("a body that is not problem JSON still gives a typed error", () => {
    const e = errorFromResponse(502, "<html>bad gateway</html>", new Headers());
    assert.ok(e instanceof ProblemError);
    assert.equal(e.status, 502);
    assert.match(e.detail, /bad gateway/);
  });
});

/** A local server answering each request with `script[i]` (a function (req, res)). */
async function scripted(script) {
  const calls = [];
  const server = http.createServer(async (req, res) => {
    let body = "";
    for await (const c of req) body += c;
    calls.push({ method: req.method, url: req.url, headers: req.headers, body });
    const step = script[Math.min(calls.length - 1, script.length - 1)];
    step(req, res);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    calls,
    client: new Client({ url: `http://127.0.0.1:${server.address().port}`, apiKey: "secret", maxRetries: 2 }),
    close() {
      server.closeAllConnections();
      server.close();
    },
  };
}
const drop = (req, res) => res.socket.destroy();
const ok = (body) => (req, res) => {
  res.writeHead(200, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
};
const fail = (status, headers = {}) => (req, res) => {
  res.writeHead(status, { "content-type": "application/problem+json", ...headers });
  res.end(JSON.stringify(problem(status, "x", "no")));
};

describe("transport", () => {
  test("a GET is retried after a network error", async () => {
    const s = await scripted([drop, ok({ id: "j1", status: "queued" })]);
    try {
      const job = await s.client.get("j1");
      assert.equal(job.id, "j1");
      assert.equal(s.calls.length, 2);
      assert.equal(s.calls[0].headers.authorization, "Bearer secret");
    } finally {
      s.close();
    }
  });

  test("a submit without Idempotency-Key is not retried after a network error", async () => {
    const s = await scripted([drop, ok({ id: "j1" })]);
    try {
      await assert.rejects(s.client.submit("k.a", { x: 1 }), NetworkError);
      assert.equal(s.calls.length, 1);
    } finally {
      s.close();
    }
  });

  test("a submit with Idempotency-Key is retried with the same key and body", async () => {
    const s = await scripted([drop, ok({ id: "j1" })]);
    try {
      const job = await s.client.submit("k.a", { x: 1 }, { idempotencyKey: "abc", maxAttempts: 2, waitS: 5 });
      assert.equal(job.id, "j1");
      assert.equal(s.calls.length, 2);
      for (const c of s.calls) {
        assert.equal(c.headers["idempotency-key"], "abc");
        assert.equal(c.headers.prefer, "wait=5");
        assert.deepEqual(JSON.parse(c.body), { kind: "k.a", input: { x: 1 }, max_attempts: 2 });
      }
    } finally {
      s.close();
    }
  });

  test("429 is retried after Retry-After, then surfaces as RateLimitedError", async () => {
    const s = await scripted([fail(429, { "retry-after": "0" }), ok({ id: "j" })]);
    try {
      assert.equal((await s.client.submit("k.a", {})).id, "j");
      assert.equal(s.calls.length, 2);
    } finally {
      s.close();
    }
    const s2 = await scripted([fail(429, { "retry-after": "0" })]);
    try {
      const e = await s2.client.get("x").catch((e) => e);
      assert.ok(e instanceof RateLimitedError);
      assert.equal(e.retryAfter, 0);
      assert.equal(s2.calls.length, 3); // the first try and 2 retries
    } finally {
      s2.close();
    }
  });

  test("503 is retried for a GET but not for a plain POST; 4xx never", async () => {
    const s = await scripted([fail(503, { "retry-after": "0" }), ok({ id: "j" })]);
    try {
      assert.equal((await s.client.get("j")).id, "j");
      assert.equal(s.calls.length, 2);
    } finally {
      s.close();
    }
    const s2 = await scripted([fail(503, { "retry-after": "0" }), ok({ id: "j" })]);
    try {
      await assert.rejects(s2.client.retry("j"), UnavailableError);
      assert.equal(s2.calls.length, 1);
    } finally {
      s2.close();
    }
    const s3 = await scripted([fail(404), ok({})]);
    try {
      await assert.rejects(s3.client.get("j"), NotFoundError);
      assert.equal(s3.calls.length, 1);
    } finally {
      s3.close();
    }
  });

  test("a request that gets no answer in timeoutMs is a NetworkError", async () => {
    const s = await scripted([() => {}]);
    try {
      const c = new Client({ url: s.client.url, apiKey: "k", timeoutMs: 200, maxRetries: 0 });
      const e = await c.get("j").catch((e) => e);
      assert.ok(e instanceof NetworkError);
      assert.match(e.message, /timed out/);
    } finally {
      s.close();
    }
  });

  test("Client reads CAPIBARA_URL and CAPIBARA_API_KEY from the environment", () => {
    const saved = { u: process.env.CAPIBARA_URL, k: process.env.CAPIBARA_API_KEY };
    process.env.CAPIBARA_URL = "http://example.invalid:9/";
    process.env.CAPIBARA_API_KEY = "env-key";
    try {
      const c = new Client();
      assert.equal(c.http.url, "http://example.invalid:9");
      assert.equal(c.http.apiKey, "env-key");
    } finally {
      for (const [k, v] of [["CAPIBARA_URL", saved.u], ["CAPIBARA_API_KEY", saved.k]]) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });
});
