"""`AsyncClient`: the `Client` API as coroutines.

Each call runs the synchronous client's HTTP call on a worker thread (`asyncio.to_thread`), so the
SDK needs no third-party HTTP library; the event loop is never blocked. `stream()` is an async
iterator fed the same way.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, TypeVar, Union

from .client import Client
from .models import Event, Job, Lease, Run

__all__ = ["AsyncClient"]

T = TypeVar("T")
_END = object()


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


async def _aiter(make: Callable[[], Iterator[Event]]) -> AsyncIterator[Event]:
    it = await _call(make)
    try:
        while True:
            item = await _call(next, it, _END)
            if item is _END:
                return
            yield item
    finally:
        await _call(it.close)  # type: ignore[attr-defined]


class AsyncClient:
    """Like `Client`, with coroutines. `url` and `api_key` default to `CAPIBARA_URL` and
    `CAPIBARA_API_KEY`."""

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, *,
                 timeout: float = 30.0, max_retries: int = 3, client: Optional[Client] = None) -> None:
        self.sync = client or Client(url, api_key, timeout=timeout, max_retries=max_retries)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.sync.close()

    # Jobs.

    async def submit(self, kind: str, input: Any = None, *, wait: Optional[float] = None,
                     idempotency_key: Optional[str] = None, **opts: Any) -> Job:
        return await _call(self.sync.submit, kind, input, wait=wait, idempotency_key=idempotency_key, **opts)

    async def submit_batch(self, jobs: Sequence[Mapping[str, Any]]) -> List[Job]:
        return await _call(self.sync.submit_batch, jobs)

    async def get(self, id: str, *, wait: Optional[float] = None) -> Job:
        return await _call(self.sync.get, id, wait=wait)

    async def wait(self, id: str, timeout: Optional[float] = None) -> Job:
        return await _call(self.sync.wait, id, timeout)

    async def list_jobs(self, **filters: Any) -> Dict[str, Any]:
        return await _call(self.sync.list_jobs, **filters)

    async def events(self, id: str, *, after: Optional[str] = None) -> List[Event]:
        return await _call(self.sync.events, id, after=after)

    def stream(self, id: str, last_event_id: Optional[str] = None) -> AsyncIterator[Event]:
        """`async for event in client.stream(id): …` (resumable with `last_event_id`)."""
        return _aiter(lambda: self.sync.stream(id, last_event_id))

    async def cancel(self, id: str) -> Job:
        return await _call(self.sync.cancel, id)

    async def retry(self, id: str) -> Job:
        return await _call(self.sync.retry, id)

    # Kinds.

    async def put_kind(self, name: str, **spec: Any) -> Dict[str, Any]:
        return await _call(self.sync.put_kind, name, **spec)

    async def get_kind(self, name: str) -> Dict[str, Any]:
        return await _call(self.sync.get_kind, name)

    async def list_kinds(self) -> List[Dict[str, Any]]:
        return await _call(self.sync.list_kinds)

    async def delete_kind(self, name: str) -> None:
        await _call(self.sync.delete_kind, name)

    # Workflows and runs.

    async def create_workflow(self, definition: Union[Mapping[str, Any], str]) -> Dict[str, Any]:
        return await _call(self.sync.create_workflow, definition)

    async def get_workflow(self, id: str) -> Dict[str, Any]:
        return await _call(self.sync.get_workflow, id)

    async def delete_workflow(self, id: str) -> None:
        await _call(self.sync.delete_workflow, id)

    async def start_run(self, workflow_id: str, input: Any = None, *, wait: Optional[float] = None,
                        idempotency_key: Optional[str] = None, callback_url: Optional[str] = None) -> Run:
        return await _call(self.sync.start_run, workflow_id, input, wait=wait,
                           idempotency_key=idempotency_key, callback_url=callback_url)

    async def get_run(self, id: str, *, wait: Optional[float] = None) -> Run:
        return await _call(self.sync.get_run, id, wait=wait)

    async def wait_run(self, id: str, timeout: Optional[float] = None) -> Run:
        return await _call(self.sync.wait_run, id, timeout)

    async def run_events(self, id: str, *, after: Optional[str] = None) -> List[Event]:
        return await _call(self.sync.run_events, id, after=after)

    def stream_run(self, id: str, last_event_id: Optional[str] = None) -> AsyncIterator[Event]:
        return _aiter(lambda: self.sync.stream_run(id, last_event_id))

    async def cancel_run(self, id: str) -> Run:
        return await _call(self.sync.cancel_run, id)

    # Schedules.

    async def create_schedule(self, name: str, cron: str, target: Optional[Mapping[str, Any]] = None, *,
                              job: Optional[Mapping[str, Any]] = None, workflow_id: Optional[str] = None,
                              input: Any = None, **opts: Any) -> Dict[str, Any]:
        return await _call(self.sync.create_schedule, name, cron, target, job=job,
                           workflow_id=workflow_id, input=input, **opts)

    async def list_schedules(self) -> List[Dict[str, Any]]:
        return await _call(self.sync.list_schedules)

    async def get_schedule(self, id: str) -> Dict[str, Any]:
        return await _call(self.sync.get_schedule, id)

    async def delete_schedule(self, id: str) -> None:
        await _call(self.sync.delete_schedule, id)

    # The worker protocol.

    async def register_worker(self, kinds: Sequence[Union[str, Mapping[str, Any]]], **opts: Any) -> Dict[str, Any]:
        return await _call(self.sync.register_worker, kinds, **opts)

    async def lease(self, worker_id: str, max_jobs: int = 1, wait_ms: Optional[int] = None) -> List[Lease]:
        return await _call(self.sync.lease, worker_id, max_jobs, wait_ms)

    async def deregister_worker(self, worker_id: str) -> None:
        await _call(self.sync.deregister_worker, worker_id)

    async def heartbeat(self, job_id: str, token: str) -> Dict[str, Any]:
        return await _call(self.sync.heartbeat, job_id, token)

    async def report_progress(self, job_id: str, token: str, percent: Optional[float] = None,
                              message: Optional[str] = None, data: Any = None) -> None:
        await _call(self.sync.report_progress, job_id, token, percent, message, data)

    async def report_logs(self, job_id: str, token: str, lines: Sequence[Mapping[str, str]]) -> None:
        await _call(self.sync.report_logs, job_id, token, lines)

    async def report_chunk(self, job_id: str, token: str, seq: int, data: Any) -> None:
        await _call(self.sync.report_chunk, job_id, token, seq, data)

    async def complete(self, job_id: str, token: str, output: Any = None) -> Job:
        return await _call(self.sync.complete, job_id, token, output)

    async def fail(self, job_id: str, token: str, type: str, message: str, *, retryable: bool = True,
                   retry_after_s: Optional[float] = None) -> Job:
        return await _call(self.sync.fail, job_id, token, type, message, retryable=retryable,
                           retry_after_s=retry_after_s)

    async def release(self, job_id: str, token: str) -> Job:
        return await _call(self.sync.release, job_id, token)
