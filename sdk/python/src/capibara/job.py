"""`JobContext`: what a handler receives for one leased job."""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Executor
from typing import Any, Callable, Deque, Optional

from .errors import CapibaraError, Cancelled, LeaseLost
from .models import Job, Lease

__all__ = ["JobContext"]

log = logging.getLogger("capibara.worker")

LEVELS = ("debug", "info", "warn", "error")


def clip(text: str, limit: int) -> str:
    """`text` cut to the server's limit of `limit` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Outbox:
    """Runs calls one after another, in order, on a shared executor (never on the caller's
    thread): an async handler's reports, so they never block its event loop."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._queue: Deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._busy = False

    def put(self, call: Callable[[], None]) -> None:
        with self._lock:
            self._queue.append(call)
            if self._busy:
                return
            self._busy = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the worker has stopped: nothing more is sent
            with self._lock:
                self._queue.clear()
                self._busy = False

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._busy = False
                    return
                call = self._queue.popleft()
            try:
                call()
            except Exception:  # pragma: no cover - calls handle their own errors
                log.exception("capibara: a queued report failed")


class JobContext:
    """One leased job, as its handler sees it: `id`, `input`, `attempt`, `kind`, `job` (the whole
    job), and the calls that report about it. Reports are best effort: a failure is logged, and a
    lost lease sets `cancelled` instead of raising."""

    def __init__(self, client: Any, lease: Lease, outbox: Optional[_Outbox] = None) -> None:
        self._client = client
        self._lease = lease
        self._outbox = outbox  # set for async handlers: reports go through it
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._seq = 0
        #: Why `cancelled` became true: "canceled", "timeout", "lease_lost" or "shutdown".
        self.cancel_reason: Optional[str] = None
        self.job: Job = lease.job
        self.id: str = lease.job.get("id", "")
        self.kind: str = lease.job.get("kind", "")
        self.input: Any = lease.job.get("input")
        self.attempt: int = int(lease.job.get("attempt") or 1)
        self.token: str = lease.token

    def __repr__(self) -> str:
        return f"JobContext(id={self.id!r}, kind={self.kind!r}, attempt={self.attempt})"

    # Cancellation.

    @property
    def cancelled(self) -> bool:
        """True once the job's cancel was requested, it timed out, its lease was lost, or the
        worker is shutting down past its grace period: stop working on it."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if `cancelled`."""
        if self._cancel.is_set():
            raise Cancelled(self.cancel_reason or "canceled")

    def wait_cancelled(self, timeout: Optional[float] = None) -> bool:
        """Sleep up to `timeout` seconds, waking early on cancellation; returns `cancelled`."""
        return self._cancel.wait(timeout)

    def _set_cancelled(self, reason: str) -> None:
        with self._lock:
            if self.cancel_reason is None:
                self.cancel_reason = reason
        self._cancel.set()

    # Reports.

    def progress(self, percent: Optional[float] = None, message: Optional[str] = None, data: Any = None) -> None:
        """Record progress (`JobProgress`): a percentage (0–100), a message, any JSON data."""
        if message is not None:
            message = clip(str(message), 1000)
        self._send(lambda: self._client.report_progress(self.id, self.token, percent, message, data))

    def log(self, message: str, level: str = "info") -> None:
        """Record a log line (`JobLog`); `level` is debug, info, warn or error."""
        if level == "warning":
            level = "warn"
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}")
        line = {"level": level, "message": clip(str(message), 10000)}
        self._send(lambda: self._client.report_logs(self.id, self.token, [line]))

    def chunk(self, data: Any) -> None:
        """Stream a piece of output (`JobOutputChunk`) to SSE readers; numbered from 0."""
        with self._lock:
            seq = self._seq
            self._seq += 1
        self._send(lambda: self._client.report_chunk(self.id, self.token, seq, data))

    def _send(self, call: Callable[[], None]) -> None:
        if self._cancel.is_set() and self.cancel_reason in ("lease_lost", "timeout", "shutdown"):
            return  # the job is no longer ours to report on
        if self._outbox is not None:
            self._outbox.put(lambda: self._guarded(call))
        else:
            self._guarded(call)

    def _guarded(self, call: Callable[[], None]) -> None:
        try:
            call()
        except LeaseLost:
            log.warning("capibara: job %s lost its lease; stopping it", self.id)
            self._set_cancelled("lease_lost")
        except (CapibaraError, TypeError, ValueError) as e:
            log.warning("capibara: report for job %s failed: %s", self.id, e)
