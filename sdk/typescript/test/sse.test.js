// The SSE parser, and the stream reader's resume with Last-Event-ID against a local HTTP server
// that drops the connection mid-stream. No Capibara server needed.

import assert from "node:assert/strict";
import http from "node:http";
import { describe, test } from "node:test";

import { Client, parseSSE } from "../src/index.js";

async function collect(chunks) {
  const out = [];
  for await (const ev of parseSSE(
    (async function* () {
      for (const c of chunks) yield c;
    })(),
  )) {
    out.push(ev);
  }
  return out;
}

describe("parseSSE", () => {
  test("parses id, event, data; default event is message; comments skipped", async () => {
    const evs = await collect([": keep-alive\n\nid: 7\nevent: JobQueued\ndata: {\"a\":1}\n\ndata: plain\n\n"]);
    assert.deepEqual(evs, [
      { id: "7", event: "JobQueued", data: '{"a":1}', retry: undefined },
      { id: "7", event: "message", data: "plain", retry: undefined },
    ]);
  });

  test("joins multi-line data, strips one space, keeps more", async () => {
    const evs = await collect(["data: one\ndata:two\ndata:   three\n\n"]);
    assert.equal(evs[0].data, "one\ntwo\n  three");
  });

  test("chunks split anywhere: inside UTF-8 characters and between \\r and \\n", async () => {
    const text = "id: 1\r\nevent: e\r\ndata: héllo wörld ✓\r\n\r\nid: 2\rdata: b\r\r";
    const bytes = new TextEncoder().encode(text);
    const whole = await collect([bytes]);
    for (let size = 1; size <= 7; size++) {
      const pieces = [];
      for (let i = 0; i < bytes.length; i += size) pieces.push(bytes.slice(i, i + size));
      assert.deepEqual(await collect(pieces), whole, `chunk size ${size}`);
    }
    assert.deepEqual(whole.map((e) => [e.id, e.event, e.data]), [
      ["1", "e", "héllo wörld ✓"],
      ["2", "message", "b"],
    ]);
  });

  test("retry field, BOM, a field without colon, and an unterminated last event", async () => {
    const evs = await collect(["\uFEFFretry: 1500\nretry: x\ndata\n\nid: 3\ndata: lost"]);
    assert.deepEqual(evs, [{ id: "", event: "message", data: "", retry: 1500 }]);
  });

  test("an event without data is not dispatched, but its id is kept", async () => {
    const evs = await collect(["id: 5\nevent: x\n\ndata: y\n\n"]);
    assert.deepEqual(evs, [{ id: "5", event: "message", data: "y", retry: undefined }]);
  });
});

describe("Client.stream", () => {
  test("resumes after a dropped connection with Last-Event-ID: no gap, no duplicate", async () => {
    const all = [1, 2, 3, 4, 5, 6].map((n) => ({
      id: String(n * 10),
      type: n === 6 ? "JobSucceeded" : "JobProgress",
      data: { n },
    }));
    const seen = [];
    const server = http.createServer((req, res) => {
      const last = req.headers["last-event-id"];
      seen.push({ last, accept: req.headers.accept, auth: req.headers.authorization });
      res.writeHead(200, { "content-type": "text/event-stream" });
      const rest = last ? all.filter((e) => Number(e.id) > Number(last)) : all;
      const frame = (e) => `id: ${e.id}\nevent: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`;
      if (seen.length === 1) {
        // First connection: two events, half of a third, then the connection breaks.
        res.write(frame(rest[0]) + frame(rest[1]) + frame(rest[2]).slice(0, 12));
        setTimeout(() => res.destroy(), 30);
      } else {
        res.end(rest.map(frame).join(""));
      }
    });
    await new Promise((r) => server.listen(0, "127.0.0.1", r));
    try {
      const client = new Client({ url: `http://127.0.0.1:${server.address().port}`, apiKey: "k" });
      const got = [];
      for await (const ev of client.stream("job-1")) got.push(ev);
      assert.deepEqual(got, all);
      assert.equal(seen.length, 2);
      assert.equal(seen[0].last, undefined);
      assert.equal(seen[1].last, "20");
      assert.equal(seen[0].accept, "text/event-stream");
      assert.equal(seen[0].auth, "Bearer k");
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });

  test("lastEventId starts after that event; breaking out closes the connection", async () => {
    let closed = 0;
    let lastHeader;
    const server = http.createServer((req, res) => {
      lastHeader = req.headers["last-event-id"];
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.write(`id: 8\nevent: A\ndata: {"id":"8"}\n\n`);
      res.on("close", () => closed++);
      // Never ends by itself.
    });
    await new Promise((r) => server.listen(0, "127.0.0.1", r));
    try {
      const client = new Client({ url: `http://127.0.0.1:${server.address().port}`, apiKey: "k" });
      for await (const ev of client.stream("j", { lastEventId: "7" })) {
        assert.equal(ev.id, "8");
        break;
      }
      assert.equal(lastHeader, "7");
      for (let i = 0; i < 50 && closed === 0; i++) await new Promise((r) => setTimeout(r, 10));
      assert.equal(closed, 1);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });

  test("aborting the signal ends the iteration quietly", async () => {
    const server = http.createServer((req, res) => {
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.write(`id: 1\ndata: {"id":"1"}\n\n`);
    });
    await new Promise((r) => server.listen(0, "127.0.0.1", r));
    try {
      const client = new Client({ url: `http://127.0.0.1:${server.address().port}`, apiKey: "k" });
      const ctrl = new AbortController();
      const got = [];
      for await (const ev of client.stream("j", { signal: ctrl.signal })) {
        got.push(ev.id);
        setTimeout(() => ctrl.abort(), 20);
      }
      assert.deepEqual(got, ["1"]);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });
});
