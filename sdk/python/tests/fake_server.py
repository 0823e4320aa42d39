"""An in-memory stand-in for the Capibara API (the parts the SDK speaks), for unit tests that
need no real server: jobs, events (JSON and SSE), kinds and the worker protocol with leases,
fencing and expiry. Knobs let a test inject failures (`fail_next`, `drop_sse_after`)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

TERMINAL = {"JobSucceeded", "JobFailed", "JobCanceled"}


class State:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.cond = threading.Condition()
        self.jobs: Dict[str, Dict[str, Any]] = {}
        self.events: Dict[str, List[Dict[str, Any]]] = {}
        self.queue: List[str] = []
        self.leases: Dict[str, Tuple[str, float]] = {}  # job id -> (token, expires at)
        self.workers: Dict[str, Dict[str, Any]] = {}
        self.kinds: Dict[str, Dict[str, Any]] = {}
        self.position = 0
        self.fail_next: List[int] = []  # statuses to answer the next requests with
        self.drop_sse_after: Optional[int] = None  # break an SSE connection after N events
        self.requests: List[Tuple[str, str]] = []
        self.batches: List[int] = []  # the size of each batch of completions
        self.lease_delay_s = 0.0  # each lease call's answer waits this long (a claim's commit)
        self.asked: List[int] = []  # max_jobs of the lease calls in flight
        self.most_asked = 0  # the most slots lease calls in flight asked for together
        self.most_lease_calls = 0  # the most lease calls in flight at once

    def append(self, job_id: str, type_: str, data: Any) -> None:
        self.position += 1
        evs = self.events.setdefault(job_id, [])
        evs.append({"id": str(self.position), "stream_type": "job", "stream_id": job_id,
                    "version": len(evs) + 1, "type": type_, "data": data, "metadata": {},
                    "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.cond.notify_all()

    def reap(self) -> None:
        now = time.monotonic()
        for job_id, (_, until) in list(self.leases.items()):
            if until <= now:
                del self.leases[job_id]
                job = self.jobs[job_id]
                self.append(job_id, "JobAttemptFailed", {"error": {"type": "worker_lost"}})
                self.after_failure(job, {"type": "worker_lost", "message": "lease expired"}, True)

    def after_failure(self, job: Dict[str, Any], error: Dict[str, Any], retryable: bool) -> None:
        job["error"] = error
        if job["cancel_requested"] and not retryable:
            job["status"] = "canceled"
            self.append(job["id"], "JobCanceled", {})
        elif retryable and job["attempt"] < job["max_attempts"]:
            job["status"] = "queued"
            self.queue.append(job["id"])
        else:
            job["status"] = "failed"
            self.append(job["id"], "JobFailed", {"error": error})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FakeServer"

    def log_message(self, *args: Any) -> None:
        pass

    # Plumbing.

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else None

    def _send(self, status: int, body: Any = None, headers: Optional[Dict[str, str]] = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        ctype = "application/problem+json" if status >= 400 else "application/json"
        if data:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _problem(self, status: int, slug: str, detail: str, field: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        body: Dict[str, Any] = {"type": f"urn:capibara:problem:{slug}", "title": slug, "status": status,
                                "detail": detail}
        if field:
            body["errors"] = [{"field": field, "message": detail}]
        self._send(status, body, headers)

    def _wait(self, job_id: str) -> Optional[float]:
        pref = self.headers.get("Prefer")
        if pref and pref.startswith("wait="):
            return float(pref[5:])
        return None

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        st = self.server.state
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = dict(parse_qsl(url.query))
        body = self._body() if method in ("POST", "PUT") else None
        with st.cond:
            st.requests.append((method, url.path))
            if st.fail_next:
                status = st.fail_next.pop(0)
                return self._problem(status, "injected", "injected failure", headers={"Retry-After": "0"})
            st.reap()
        if self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            return self._problem(401, "unauthorized", "missing or invalid API key")
        p = parts[1:]  # drop "v1"
        if p[:1] == ["jobs"] and len(p) == 1 and method == "POST":
            return self._submit(body)
        if p[:1] == ["jobs"] and len(p) == 2 and method == "GET":
            return self._get(p[1])
        if p[:1] == ["jobs"] and len(p) == 3 and p[2] == "events":
            return self._events(p[1], query)
        if p[:1] == ["jobs"] and len(p) == 3 and p[2] == "cancel":
            return self._cancel(p[1])
        if p[:1] == ["jobs"] and len(p) == 3:
            return self._leased(p[1], p[2], body)
        if p[:1] == ["kinds"] and len(p) == 2 and method == "PUT":
            with st.cond:
                st.kinds[p[1]] = dict(body or {}, name=p[1])
                return self._send(201, st.kinds[p[1]])
        if p == ["workers"] and method == "POST":
            wid = str(uuid.uuid4())
            with st.cond:
                st.workers[wid] = dict(body, id=wid, status="active")
            return self._send(201, {"id": wid, "lease_s": st.lease_s, "heartbeat_s": st.lease_s / 3,
                                    "kinds": body["kinds"]})
        if p[:1] == ["workers"] and len(p) == 3 and p[2] == "lease":
            return self._lease(p[1], body or {})
        if p[:1] == ["workers"] and len(p) == 3 and p[2] == "complete":
            return self._complete_many((body or {}).get("jobs") or [])
        if p[:1] == ["workers"] and len(p) == 2 and method == "DELETE":
            with st.cond:
                st.workers[p[1]]["status"] = "stopped"
            return self._send(204)
        return self._problem(404, "not-found", f"no route {method} {url.path}")

    # Jobs.

    def _submit(self, body: Dict[str, Any]) -> None:
        st = self.server.state
        if not isinstance(body.get("kind"), str):
            return self._problem(422, "validation", "kind: required", "kind")
        job_id = str(uuid.uuid4())
        with st.cond:
            job = {"id": job_id, "kind": body["kind"], "status": "queued", "input": body.get("input", {}),
                   "output": None, "error": None, "progress": None, "attempt": 0,
                   "max_attempts": body.get("max_attempts", 3), "timeout_s": body.get("timeout_s"),
                   "cancel_requested": False}
            st.jobs[job_id] = job
            st.append(job_id, "JobSubmitted", {"kind": job["kind"]})
            st.queue.append(job_id)
        self._answer_job(job_id, self._wait(job_id))

    def _answer_job(self, job_id: str, wait: Optional[float]) -> None:
        st = self.server.state
        with st.cond:
            if wait:
                end = time.monotonic() + wait
                while st.jobs[job_id]["status"] not in ("succeeded", "failed", "canceled"):
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    st.cond.wait(min(left, 0.05))
                    st.reap()
            job = dict(st.jobs[job_id])
        done = job["status"] in ("succeeded", "failed", "canceled")
        self._send(200 if wait is not None and done else (200 if wait is None else 202), job)

    def _get(self, job_id: str) -> None:
        if job_id not in self.server.state.jobs:
            return self._problem(404, "not-found", f"no job `{job_id}`")
        self._answer_job(job_id, self._wait(job_id))

    def _cancel(self, job_id: str) -> None:
        st = self.server.state
        with st.cond:
            job = st.jobs[job_id]
            if job["status"] == "queued":
                st.queue.remove(job_id)
                job["status"] = "canceled"
                st.append(job_id, "JobCanceled", {})
                return self._send(200, dict(job))
            job["cancel_requested"] = True
            st.append(job_id, "JobCancelRequested", {})
            return self._send(202, dict(job))

    def _events(self, job_id: str, query: Dict[str, str]) -> None:
        st = self.server.state
        after = int(self.headers.get("Last-Event-ID") or query.get("after") or 0)
        if "text/event-stream" not in (self.headers.get("Accept") or ""):
            with st.cond:
                items = [e for e in st.events.get(job_id, []) if int(e["id"]) > after]
            return self._send(200, {"items": items, "next_cursor": None})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0

        def chunk(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        chunk(b": hello\n\n")
        while True:
            with st.cond:
                items = [e for e in st.events.get(job_id, []) if int(e["id"]) > after]
                if not items and st.jobs[job_id]["status"] in ("succeeded", "failed", "canceled"):
                    chunk(b"")
                    return
                if not items:
                    st.cond.wait(0.05)
                    st.reap()
                    continue
            for e in items:
                if st.drop_sse_after is not None and sent >= st.drop_sse_after:
                    st.drop_sse_after = None
                    self.wfile.write(b"ff\r\npartial")  # a chunk cut short, then the socket closes
                    self.wfile.flush()
                    self.close_connection = True
                    return
                chunk(f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n".encode())
                after = int(e["id"])
                sent += 1
                if e["type"] in TERMINAL:
                    chunk(b"")
                    return

    # The worker protocol.

    def _lease(self, worker_id: str, body: Dict[str, Any]) -> None:
        st = self.server.state
        end = time.monotonic() + body.get("wait_ms", 30000) / 1000.0
        out: List[Dict[str, Any]] = []
        with st.cond:
            st.asked.append(body.get("max_jobs", 1))
            st.most_asked = max(st.most_asked, sum(st.asked))
            st.most_lease_calls = max(st.most_lease_calls, len(st.asked))
        try:
            self._take(worker_id, body, end, out)
            if st.lease_delay_s:
                time.sleep(st.lease_delay_s)
        finally:
            with st.cond:
                st.asked.remove(body.get("max_jobs", 1))
        self._send(200, {"jobs": out})

    def _take(self, worker_id: str, body: Dict[str, Any], end: float, out: List[Dict[str, Any]]) -> None:
        st = self.server.state
        kinds = {k if isinstance(k, str) else k["name"] for k in st.workers[worker_id]["kinds"]}
        with st.cond:
            while True:
                for job_id in list(st.queue):
                    if len(out) >= body.get("max_jobs", 1):
                        break
                    job = st.jobs[job_id]
                    if job["kind"] in kinds:
                        st.queue.remove(job_id)
                        job["attempt"] += 1
                        job["status"] = "running"
                        token = f"{job_id}.{job['attempt']}.{uuid.uuid4().hex[:8]}"
                        st.leases[job_id] = (token, time.monotonic() + st.lease_s)
                        st.append(job_id, "JobStarted", {"attempt": job["attempt"], "worker": worker_id})
                        out.append({"job": dict(job), "lease": {"token": token, "expires_at": "later"}})
                if out or time.monotonic() >= end:
                    break
                st.cond.wait(min(0.05, max(0.0, end - time.monotonic())))
                st.reap()

    def _complete_many(self, jobs: List[Dict[str, Any]]) -> None:
        st = self.server.state
        results = []
        with st.cond:
            st.batches.append(len(jobs))
            for j in jobs:
                held = st.leases.get(j["id"])
                if held is None or held[0] != j["lease"]:
                    results.append({"id": j["id"], "status": 409, "problem": {
                        "type": "urn:capibara:problem:lease-lost", "status": 409,
                        "title": "Conflict", "detail": "the lease is no longer held"}})
                    continue
                self._succeed(st, j["id"], j.get("output"))
                results.append({"id": j["id"], "status": 200})
        self._send(200, {"results": results})

    @staticmethod
    def _succeed(st: "State", job_id: str, output: Any) -> Dict[str, Any]:
        del st.leases[job_id]
        job = st.jobs[job_id]
        job["status"] = "succeeded"
        job["output"] = output
        st.append(job_id, "JobSucceeded", {"output": output})
        return job

    def _leased(self, job_id: str, action: str, body: Any) -> None:
        st = self.server.state
        token = self.headers.get("Capibara-Lease")
        with st.cond:
            held = st.leases.get(job_id)
            if held is None or held[0] != token:
                return self._problem(409, "lease-lost", "the lease is no longer held")
            job = st.jobs[job_id]
            if action == "heartbeat":
                st.leases[job_id] = (token, time.monotonic() + st.lease_s)
                return self._send(200, {"cancel_requested": job["cancel_requested"], "expires_at": "later"})
            if action == "progress":
                job["progress"] = body
                st.append(job_id, "JobProgress", body)
            elif action == "logs":
                for line in body["lines"]:
                    st.append(job_id, "JobLog", line)
            elif action == "chunks":
                st.append(job_id, "JobOutputChunk", body)
            elif action == "complete":
                return self._send(200, dict(self._succeed(st, job_id, (body or {}).get("output"))))
            elif action == "fail":
                del st.leases[job_id]
                st.append(job_id, "JobAttemptFailed", body)
                st.after_failure(job, body["error"], body.get("retryable", True))
                return self._send(200, dict(job))
            elif action == "release":
                del st.leases[job_id]
                job["status"] = "queued"
                job["attempt"] -= 1
                st.queue.append(job_id)
                st.append(job_id, "JobQueued", {"reason": "released"})
                return self._send(200, dict(job))
            else:
                return self._problem(404, "not-found", action)
        self._send(204)


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, lease_s: float = 1.5, api_key: str = "test-key") -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = State(lease_s)
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()


if __name__ == "__main__":  # python fake_server.py: serve until killed, printing the URL
    import sys

    srv = FakeServer(lease_s=float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)
    print(srv.url, flush=True)
    srv.serve_forever()
