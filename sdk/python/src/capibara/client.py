"""The synchronous client: jobs, events, kinds, workflows, schedules and the worker protocol."""

from __future__ import annotations

import os
import time
import urllib.parse
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from . import sse
from ._http import Response, Transport
from .errors import ProblemError, WaitTimeout, problem_from_response
from .models import Event, Job, Lease, Run

__all__ = ["Client", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8080"
MAX_SERVER_WAIT = 60.0  # the server holds a `Prefer: wait` at most this long
_TERMINAL_JOB_EVENTS = frozenset({"JobSucceeded", "JobFailed", "JobCanceled"})


def _q(segment: str) -> str:
    return urllib.parse.quote(str(segment), safe="")


def _items(body: Any) -> List[Any]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        return list(body.get("items") or [])
    return []


def _prefer(wait: float) -> str:
    wait = max(0.0, min(MAX_SERVER_WAIT, wait))
    return f"wait={wait:.3f}".rstrip("0").rstrip(".")


class Client:
    """A Capibara API client. `url` and `api_key` default to `CAPIBARA_URL` and
    `CAPIBARA_API_KEY`. Safe to share between threads."""

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
    ) -> None:
        url = url or os.environ.get("CAPIBARA_URL") or DEFAULT_URL
        api_key = api_key if api_key is not None else os.environ.get("CAPIBARA_API_KEY")
        self._http = Transport(url, api_key, timeout=timeout, max_retries=max_retries)

    @property
    def url(self) -> str:
        return self._http.url

    def close(self) -> None:
        """Close idle pooled connections (the client stays usable)."""
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Response:
        """A raw API call (`path` starts with `/v1/`); errors are raised as typed exceptions."""
        return self._http.request(method, path, **kwargs)

    # Jobs.

    def submit(
        self,
        kind: str,
        input: Any = None,
        *,
        wait: Optional[float] = None,
        idempotency_key: Optional[str] = None,
        **opts: Any,
    ) -> Job:
        """Submit a job. `opts` are the submission's other fields (`queue`, `priority`, `run_at`,
        `max_attempts`, `timeout_s`, `backoff`, `tags`, `callback_url`, `callback_events`, `dedup`,
        `debounce`, `ttl_s`, `expires_at`, `deadline_s`).
        With `wait`, waits up to that many seconds and returns the job as it is then.
        An `Idempotency-Key` is always sent (a random one unless given), so a submission is
        safely retried after a network error."""
        body: Dict[str, Any] = {"kind": kind}
        if input is not None:
            body["input"] = input
        body.update({k: v for k, v in opts.items() if v is not None})
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        start = time.monotonic()
        if wait is not None:
            headers["Prefer"] = _prefer(wait)
        timeout = None if wait is None else self._http.timeout + min(wait, MAX_SERVER_WAIT)
        job = Job(self._http.request("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout).body)
        if wait is not None and not job.done and wait > MAX_SERVER_WAIT:
            left = wait - (time.monotonic() - start)
            try:
                return self.wait(job.id, timeout=left)
            except WaitTimeout as e:
                return Job(e.resource or job)
        return job

    def submit_batch(self, jobs: Sequence[Mapping[str, Any]]) -> List[Job]:
        """Submit up to 1,000 jobs at once, all or none (`[{"kind": …, "input": …}, …]`)."""
        res = self._http.request("POST", "/v1/jobs/batch", json={"jobs": list(jobs)})
        return [Job(j) for j in _items(res.body)]

    def get(self, id: str, *, wait: Optional[float] = None) -> Job:
        """A job; with `wait` (≤ 60 s), the server answers as soon as it finishes."""
        headers = {"Prefer": _prefer(wait)} if wait is not None else None
        timeout = None if wait is None else self._http.timeout + min(wait, MAX_SERVER_WAIT)
        return Job(self._http.request("GET", f"/v1/jobs/{_q(id)}", headers=headers, timeout=timeout).body)

    def wait(self, id: str, timeout: Optional[float] = None) -> Job:
        """Wait until the job finishes (long polls with `Prefer: wait`) and return it; raises
        `WaitTimeout` after `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = MAX_SERVER_WAIT if deadline is None else deadline - time.monotonic()
            job = self.get(id, wait=max(0.0, min(MAX_SERVER_WAIT, left)))
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {id} is still {job.status} after {timeout} s", job)

    def list_jobs(self, **filters: Any) -> Dict[str, Any]:
        """One page of jobs, newest first: `{items, next_cursor}`. Filters: `status`, `kind`,
        `queue`, `tag` (`"k:v"`, or a list), `limit`, `cursor`."""
        query = []
        for k, v in filters.items():
            for one in v if isinstance(v, (list, tuple)) else [v]:
                query.append((k, one))
        body = self._http.request("GET", "/v1/jobs", query=query).body or {}
        return {"items": [Job(j) for j in _items(body)], "next_cursor": body.get("next_cursor")}

    def events(self, id: str, *, after: Optional[str] = None) -> List[Event]:
        """Every event of the job so far (after the event id `after`), in order."""
        return self._pages(f"/v1/jobs/{_q(id)}/events", after)

    def stream(self, id: str, last_event_id: Optional[str] = None) -> Iterator[Event]:
        """Follow the job's events as they happen (SSE), from the start or after `last_event_id`;
        reconnects on its own after a network error without gap or duplicate, and ends after
        the job's terminal event. Each event's `id` resumes the stream in a later call."""
        return sse.follow(
            self._http,
            f"/v1/jobs/{_q(id)}/events",
            last_event_id,
            is_terminal=lambda e: e.get("type") in _TERMINAL_JOB_EVENTS,
        )

    def cancel(self, id: str) -> Job:
        """Cancel: a waiting job at once; a running one is told to stop (its worker records it)."""
        return Job(self._http.request("POST", f"/v1/jobs/{_q(id)}/cancel", idempotent=True).body)

    def retry(self, id: str) -> Job:
        """Queue a failed or canceled job again with a fresh budget of attempts."""
        return Job(self._http.request("POST", f"/v1/jobs/{_q(id)}/retry").body)

    def _pages(self, path: str, after: Optional[str]) -> List[Event]:
        out: List[Event] = []
        cursor = after
        while True:
            query = [("limit", 500), ("after", cursor)]
            body = self._http.request("GET", path, query=query).body or {}
            out.extend(Event(e) for e in _items(body))
            cursor = body.get("next_cursor") if isinstance(body, dict) else None
            if not cursor:
                return out

    # Kinds.

    def put_kind(self, name: str, **spec: Any) -> Dict[str, Any]:
        """Create or replace your kind `name` (`description`, `queue`, `input_schema`,
        `output_schema`, `timeout_s`, `max_attempts`, `priority`, `mode`)."""
        body = {k: v for k, v in spec.items() if v is not None}
        return self._http.request("PUT", f"/v1/kinds/{_q(name)}", json=body).body or {}

    def get_kind(self, name: str) -> Dict[str, Any]:
        return self._http.request("GET", f"/v1/kinds/{_q(name)}").body or {}

    def list_kinds(self) -> List[Dict[str, Any]]:
        """The built-in kinds and your namespace's own."""
        return _items(self._http.request("GET", "/v1/kinds").body)

    def delete_kind(self, name: str) -> None:
        self._http.request("DELETE", f"/v1/kinds/{_q(name)}")

    # Workflows and runs.

    def create_workflow(self, definition: Union[Mapping[str, Any], str]) -> Dict[str, Any]:
        """Create a workflow from a definition (a dict, or YAML text)."""
        if isinstance(definition, str):
            res = self._http.request(
                "POST", "/v1/workflows", body=definition.encode(),
                headers={"Content-Type": "application/yaml"},
            )
        else:
            res = self._http.request("POST", "/v1/workflows", json=dict(definition))
        return res.body or {}

    def get_workflow(self, id: str) -> Dict[str, Any]:
        return self._http.request("GET", f"/v1/workflows/{_q(id)}").body or {}

    def delete_workflow(self, id: str) -> None:
        self._http.request("DELETE", f"/v1/workflows/{_q(id)}")

    def start_run(
        self,
        workflow_id: str,
        input: Any = None,
        *,
        wait: Optional[float] = None,
        idempotency_key: Optional[str] = None,
        callback_url: Optional[str] = None,
    ) -> Run:
        """Start a run of a workflow; with `wait`, return it as it is after up to that long."""
        body: Dict[str, Any] = {}
        if input is not None:
            body["input"] = input
        if callback_url is not None:
            body["callback_url"] = callback_url
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        start = time.monotonic()
        if wait is not None:
            headers["Prefer"] = _prefer(wait)
        timeout = None if wait is None else self._http.timeout + min(wait, MAX_SERVER_WAIT)
        res = self._http.request(
            "POST", f"/v1/workflows/{_q(workflow_id)}/runs", json=body, headers=headers, timeout=timeout
        )
        run = Run(res.body)
        if wait is not None and not run.done and wait > MAX_SERVER_WAIT:
            try:
                return self.wait_run(run.id, timeout=wait - (time.monotonic() - start))
            except WaitTimeout as e:
                return Run(e.resource or run)
        return run

    def get_run(self, id: str, *, wait: Optional[float] = None) -> Run:
        headers = {"Prefer": _prefer(wait)} if wait is not None else None
        timeout = None if wait is None else self._http.timeout + min(wait, MAX_SERVER_WAIT)
        return Run(self._http.request("GET", f"/v1/runs/{_q(id)}", headers=headers, timeout=timeout).body)

    def wait_run(self, id: str, timeout: Optional[float] = None) -> Run:
        """Wait until the run ends; raises `WaitTimeout` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = MAX_SERVER_WAIT if deadline is None else deadline - time.monotonic()
            run = self.get_run(id, wait=max(0.0, min(MAX_SERVER_WAIT, left)))
            if run.done:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"run {id} is still {run.status} after {timeout} s", run)

    def run_events(self, id: str, *, after: Optional[str] = None) -> List[Event]:
        return self._pages(f"/v1/runs/{_q(id)}/events", after)

    def stream_run(self, id: str, last_event_id: Optional[str] = None) -> Iterator[Event]:
        """Follow a run's events (SSE), resumable like `stream`."""
        return sse.follow(self._http, f"/v1/runs/{_q(id)}/events", last_event_id)

    def cancel_run(self, id: str) -> Run:
        return Run(self._http.request("POST", f"/v1/runs/{_q(id)}/cancel", idempotent=True).body)

    # Schedules.

    def create_schedule(
        self,
        name: str,
        cron: str,
        target: Optional[Mapping[str, Any]] = None,
        *,
        job: Optional[Mapping[str, Any]] = None,
        workflow_id: Optional[str] = None,
        input: Any = None,
        **opts: Any,
    ) -> Dict[str, Any]:
        """Create a schedule that submits `job` (a submission: `{"kind": …, "input": …}`) or starts
        a run of `workflow_id` with `input` (or give the raw `target`). `opts`: `timezone`,
        `overlap`, `catch_up`, `catch_up_window_s`, `jitter_s`, `start_at`, `end_at`."""
        if target is None:
            if job is not None:
                target = {"type": "job", "job": dict(job)}
            elif workflow_id is not None:
                target = {"type": "workflow", "workflow_id": workflow_id}
                if input is not None:
                    target["input"] = input
            else:
                raise ValueError("give `job`, `workflow_id` or `target`")
        body: Dict[str, Any] = {"name": name, "cron": cron, "target": dict(target)}
        body.update({k: v for k, v in opts.items() if v is not None})
        return self._http.request("POST", "/v1/schedules", json=body).body or {}

    def list_schedules(self) -> List[Dict[str, Any]]:
        return _items(self._http.request("GET", "/v1/schedules").body)

    def get_schedule(self, id: str) -> Dict[str, Any]:
        return self._http.request("GET", f"/v1/schedules/{_q(id)}").body or {}

    def delete_schedule(self, id: str) -> None:
        self._http.request("DELETE", f"/v1/schedules/{_q(id)}")

    # The worker protocol (docs/workers.md). `Worker` uses these; call them yourself to speak
    # the protocol by hand. Lease-scoped calls raise `LeaseLost` on a 409.

    def register_worker(
        self,
        kinds: Sequence[Union[str, Mapping[str, Any]]],
        *,
        queues: Optional[Sequence[str]] = None,
        concurrency: Optional[int] = None,
        name: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        version: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Register a worker for `kinds` (names, or `{"name": …, <kind spec>}` objects that
        register or update the kind). Answers `{id, lease_s, heartbeat_s, kinds, queues, …}`."""
        body: Dict[str, Any] = {"kinds": [k if isinstance(k, str) else dict(k) for k in kinds]}
        if queues is not None:
            body["queues"] = list(queues)
        if labels is not None:
            body["labels"] = dict(labels)
        for key, value in (("concurrency", concurrency), ("name", name), ("version", version)):
            if value is not None:
                body[key] = value
        return self._http.request("POST", "/v1/workers", json=body).body or {}

    def lease(self, worker_id: str, max_jobs: int = 1, wait_ms: Optional[int] = None) -> List[Lease]:
        """Take up to `max_jobs` jobs, waiting up to `wait_ms` (≤ 30,000) for one to arrive."""
        body: Dict[str, Any] = {"max_jobs": max_jobs}
        if wait_ms is not None:
            body["wait_ms"] = wait_ms
        hold = (30000 if wait_ms is None else wait_ms) / 1000.0
        res = self._http.request(
            "POST", f"/v1/workers/{_q(worker_id)}/lease", json=body,
            timeout=self._http.timeout + hold, idempotent=False,
        )
        body_out = res.body if isinstance(res.body, dict) else {}
        return [Lease.from_item(item) for item in body_out.get("jobs") or []]

    def deregister_worker(self, worker_id: str) -> None:
        self._http.request("DELETE", f"/v1/workers/{_q(worker_id)}")

    def _leased(
        self, job_id: str, token: str, action: str, body: Any = None, idempotent: bool = False
    ) -> Response:
        kwargs: Dict[str, Any] = {} if body is None else {"json": body}
        return self._http.request(
            "POST", f"/v1/jobs/{_q(job_id)}/{action}", headers={"Capibara-Lease": token},
            lease_scoped=True, idempotent=idempotent, **kwargs,
        )

    def heartbeat(self, job_id: str, token: str) -> Dict[str, Any]:
        """Renew the lease; answers `{cancel_requested, expires_at}`."""
        return self._leased(job_id, token, "heartbeat", idempotent=True).body or {}

    def report_progress(
        self, job_id: str, token: str, percent: Optional[float] = None,
        message: Optional[str] = None, data: Any = None,
    ) -> None:
        body: Dict[str, Any] = {}
        if percent is not None:
            body["percent"] = percent
        if message is not None:
            body["message"] = message
        if data is not None:
            body["data"] = data
        self._leased(job_id, token, "progress", body)

    def report_logs(self, job_id: str, token: str, lines: Sequence[Mapping[str, str]]) -> None:
        """Log lines: `[{"level": "info", "message": …}, …]` (1–100)."""
        self._leased(job_id, token, "logs", {"lines": [dict(line) for line in lines]})

    def report_chunk(self, job_id: str, token: str, seq: int, data: Any) -> None:
        self._leased(job_id, token, "chunks", {"seq": seq, "data": data})

    # The final reports are fenced (a repeat after success is a 409 that records nothing), so
    # they are retried after a network error.

    def complete(self, job_id: str, token: str, output: Any = None) -> Job:
        body = {} if output is None else {"output": output}
        return Job(self._leased(job_id, token, "complete", body, idempotent=True).body or {})

    def complete_many(
        self, worker_id: str, jobs: Sequence[Tuple[str, str, Any]]
    ) -> List[Optional[ProblemError]]:
        """Complete up to 100 jobs of worker `worker_id` in one call: `(job_id, token, output)`
        each. One entry per job, in order: None when it was recorded, else the typed error the
        one-job `complete` would have raised (`LeaseLost`, `ValidationError`, …)."""
        body = {"jobs": [
            {"id": job_id, "lease": token, **({} if output is None else {"output": output})}
            for job_id, token, output in jobs
        ]}
        res = self._http.request("POST", f"/v1/workers/{_q(worker_id)}/complete", json=body,
                                 idempotent=True)
        results = (res.body or {}).get("results") or []
        return [None if r.get("status") == 200 else
                problem_from_response(int(r.get("status") or 500), r.get("problem"), lease_scoped=True)
                for r in results]

    def fail(
        self, job_id: str, token: str, type: str, message: str, *,
        retryable: bool = True, retry_after_s: Optional[float] = None,
    ) -> Job:
        body: Dict[str, Any] = {"error": {"type": type, "message": message}, "retryable": retryable}
        if retry_after_s is not None:
            body["retry_after_s"] = retry_after_s
        return Job(self._leased(job_id, token, "fail", body, idempotent=True).body or {})

    def release(self, job_id: str, token: str) -> Job:
        """Give the job back (queued again without using up an attempt)."""
        return Job(self._leased(job_id, token, "release", idempotent=True).body or {})
