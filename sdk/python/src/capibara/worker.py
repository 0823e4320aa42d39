"""`Worker`: runs decorated handlers for your kinds over the HTTP worker protocol."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .client import Client
from .errors import (
    CapibaraError,
    Cancelled,
    Conflict,
    Fatal,
    LeaseLost,
    NotFound,
    RetryAfter,
    ValidationError,
)
from .job import JobContext, _Outbox, clip
from .models import Lease

__all__ = ["Worker"]

log = logging.getLogger("capibara.worker")

Handler = Callable[[JobContext], Any]
_KIND_FIELDS = ("description", "queue", "input_schema", "output_schema", "timeout_s", "max_attempts", "priority")


class _Spec:
    def __init__(self, kind: str, fn: Handler, fields: Dict[str, Any]) -> None:
        self.kind = kind
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        self.fields = fields

    def declaration(self) -> Any:
        # A bare name leaves an existing kind's definition as it is.
        return dict(self.fields, name=self.kind) if self.fields else self.kind


class _Completion:
    """One job's success, waiting to be sent in a batch."""

    def __init__(self, worker_id: str, job_id: str, token: str, output: Any) -> None:
        self.worker_id = worker_id
        self.job_id = job_id
        self.token = token
        self.output = output
        self.error: Optional[BaseException] = None
        self.done = threading.Event()


class _Completions:
    """Successes sent together: a handler thread that finishes while fewer than `IN_FLIGHT`
    batches are in flight sends one (`POST /v1/workers/{id}/complete`, up to 100 jobs), and
    keeps sending what finished meanwhile; the others wait for their job's result. Under load one request (and
    one group commit) records many jobs; a lone job goes out at once."""

    MAX = 100
    IN_FLIGHT = 2  # requests at once: one fills while the other is answered

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._pending: List[_Completion] = []
        self._sending = 0

    def complete(self, worker_id: str, job_id: str, token: str, output: Any) -> None:
        """Record the job's success; raises what `Client.complete` would (`LeaseLost`,
        `ValidationError`, …)."""
        mine = _Completion(worker_id, job_id, token, output)
        with self._lock:
            self._pending.append(mine)
            lead = self._sending < self.IN_FLIGHT
            if lead:
                self._sending += 1
        if lead:
            self._send_pending()
        mine.done.wait()
        if mine.error is not None:
            raise mine.error

    def _send_pending(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._sending -= 1
                    return
                # One worker id per request (a worker that registered again has two).
                wid = self._pending[0].worker_id
                batch = [c for c in self._pending if c.worker_id == wid][: self.MAX]
                sent = set(map(id, batch))
                self._pending = [c for c in self._pending if id(c) not in sent]
            try:
                errors = self._client.complete_many(wid, [(c.job_id, c.token, c.output) for c in batch])
            except BaseException as e:  # the whole batch failed: each job's report did
                errors = [e] * len(batch)
            for c, e in zip(batch, errors):
                c.error = e
                c.done.set()
            for c in batch[len(errors):]:  # an answer short of results: not recorded
                c.error = CapibaraError("the batch answer has no result for this job")
                c.done.set()


class _Threads:
    """Threads for sync handlers, kept from one job to the next. Starting a thread per job made
    the lease thread wait in `Thread.start` for each new thread to get the GIL: under load that
    was most of its time. A job goes to an idle thread; a new one starts only when none is idle
    (a handler that never returns holds its thread, not the others'); a thread idle for
    `IDLE_S` ends, and `close` ends them all once their jobs are done."""

    IDLE_S = 60.0

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._tasks: "queue.SimpleQueue[Optional[Tuple[Callable[..., Any], Tuple[Any, ...]]]]" = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a task that no submit has counted on yet
        self._alive = 0
        self._started = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the handler threads are closed")
            spawn = self._idle == 0
            if spawn:
                self._alive += 1
                self._started += 1
                name = f"{self._name}-{self._started}"
            else:
                self._idle -= 1
        self._tasks.put((fn, args))
        if spawn:
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def close(self) -> None:
        """Let every thread end once the jobs it has are done."""
        with self._lock:
            self._closed = True
            alive = self._alive
        for _ in range(alive):
            self._tasks.put(None)

    def _serve(self) -> None:
        try:
            while True:
                try:
                    task = self._tasks.get(timeout=self.IDLE_S)
                except queue.Empty:
                    with self._lock:
                        if self._idle > 0:  # nobody counts on this thread: it may end
                            self._idle -= 1
                            return
                    continue  # a submit counted on it: its task is on the way
                if task is None:
                    return
                fn, args = task
                try:
                    fn(*args)
                except BaseException:  # a task's failure is its own (they catch theirs)
                    log.exception("capibara: a handler thread's task raised")
                with self._lock:
                    if self._closed:
                        return
                    self._idle += 1
        finally:
            with self._lock:
                self._alive -= 1


class _Running:
    """One leased job while the worker holds it."""

    def __init__(self, lease: Lease, spec: _Spec, ctx: JobContext, heartbeat_s: float, timeout_s: Optional[float]) -> None:
        now = time.monotonic()
        self.lease = lease
        self.spec = spec
        self.ctx = ctx
        self.next_heartbeat = now + heartbeat_s
        self.deadline = None if not timeout_s else now + float(timeout_s)
        self.timeout_s = timeout_s
        self.cancel_requested = False
        self.heartbeat_busy = False
        self.future: Optional["Future[Any]"] = None  # an async handler's task
        self.worker_id = ""  # the registration that leased it
        self.slot_freed = False  # its handler no longer counts against the concurrency
        self._final = False
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.ctx.id

    def claim_final(self) -> bool:
        """True exactly once: the caller makes the job's one final report (or drops it)."""
        with self._lock:
            if self._final:
                return False
            self._final = True
            return True

    @property
    def finalized(self) -> bool:
        return self._final


class Worker:
    """Runs handlers for your kinds.

        worker = Worker()

        @worker.handler("image.resize", timeout_s=60)
        def resize(job):
            job.progress(50)
            return {"width": job.input["width"]}

        worker.run()   # until SIGTERM / SIGINT / worker.stop()

    Sync handlers run on threads (at most `concurrency` at once); `async def` handlers run on one
    event loop thread (the caller's loop under `run_async`). The return value is the output;
    raise `Fatal` to fail without retry, `RetryAfter` to retry after a delay; any other exception
    fails the attempt (retried per the job's policy) with the exception's class name as type.
    """

    #: Lease calls out at once (see `_lease_loop`).
    LEASES_IN_FLIGHT = 2

    def __init__(
        self,
        client: Optional[Client] = None,
        concurrency: int = 32,
        name: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        version: Optional[str] = None,
        *,
        queues: Optional[Sequence[str]] = None,
        grace_s: float = 30.0,
        poll_s: float = 5.0,
        heartbeat_s: Optional[float] = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.client = client or Client()
        self.concurrency = concurrency
        self.name = name
        self.labels = dict(labels) if labels else None
        self.version = version
        self.queues = list(queues) if queues else None
        self.grace_s = grace_s
        self.poll_s = max(0.0, min(30.0, poll_s))
        self.heartbeat_s = heartbeat_s
        self.worker_id: Optional[str] = None
        self._specs: Dict[str, _Spec] = {}
        self._running: Dict[str, _Running] = {}
        self._completions = _Completions(self.client)
        self._threads = _Threads("capibara-handler")
        self._active = 0  # handlers still executing (a timed-out sync one included)
        self._asked = 0  # slots that lease calls in flight may fill
        self._reporting = 0  # final reports under way on handler threads
        self._cond = threading.Condition()
        self._registering = threading.Lock()
        self._stop = threading.Event()
        self._force = threading.Event()
        self._done = threading.Event()
        #: Set once the worker is registered and about to take jobs.
        self.ready = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._io: Optional[ThreadPoolExecutor] = None
        self._registration: Dict[str, Any] = {}
        self._served = False

    # Handlers.

    def handler(
        self,
        kind: str,
        *,
        input_schema: Optional[Mapping[str, Any]] = None,
        output_schema: Optional[Mapping[str, Any]] = None,
        queue: Optional[str] = None,
        timeout_s: Optional[int] = None,
        max_attempts: Optional[int] = None,
        priority: Optional[str] = None,
        description: Optional[str] = None,
    ) -> Callable[[Handler], Handler]:
        """Decorate `def f(job)` or `async def f(job)` to handle `kind`. Given fields declare the
        kind (registered or updated when the worker starts); none leaves it as it is."""
        given = dict(
            input_schema=input_schema, output_schema=output_schema, queue=queue, timeout_s=timeout_s,
            max_attempts=max_attempts, priority=priority, description=description,
        )
        fields = {k: v for k, v in given.items() if v is not None}

        def decorate(fn: Handler) -> Handler:
            self._specs[kind] = _Spec(kind, fn, fields)
            return fn

        return decorate

    @property
    def kinds(self) -> List[str]:
        return list(self._specs)

    # Running.

    def stop(self) -> None:
        """Stop leasing and shut down gracefully (as on SIGTERM). Safe from any thread; a second
        call skips the rest of the grace period."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def run(self) -> None:
        """Register, take and run jobs until `stop()`, SIGTERM or SIGINT; then stop leasing, give
        running handlers `grace_s` seconds, release what is left and deregister."""
        restore = self._install_signals()
        try:
            self._serve(own_loop=True)
        finally:
            for sig, old in restore:
                signal.signal(sig, old)

    @contextlib.contextmanager
    def background(self) -> Iterator["Worker"]:
        """Run the worker on a thread for the duration of a `with` block (registered on entry,
        stopped gracefully on exit)."""
        failed: List[BaseException] = []

        def main() -> None:
            try:
                self._serve(own_loop=True)
            except BaseException as e:
                failed.append(e)
                self.ready.set()

        t = threading.Thread(target=main, name="capibara-worker", daemon=True)
        t.start()
        self.ready.wait()
        if failed:
            raise failed[0]
        try:
            yield self
        finally:
            self.stop()
            t.join()
        if failed:
            raise failed[0]

    async def run_async(self) -> None:
        """`run()` for asyncio programs: async handlers run on the calling loop; the protocol's
        blocking HTTP calls run on threads. Cancelling this coroutine stops the worker."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        fut = loop.run_in_executor(None, self._serve, False)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.stop()
            await fut
            raise
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _install_signals(self) -> List[Tuple[int, Any]]:
        if threading.current_thread() is not threading.main_thread():
            return []
        restore: List[Tuple[int, Any]] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            restore.append((sig, signal.getsignal(sig)))
            signal.signal(sig, lambda _s, _f: self.stop())
        return restore

    def _serve(self, own_loop: bool) -> None:
        if not self._specs:
            raise ValueError("no handlers: decorate one with @worker.handler(kind)")
        with self._cond:
            if self._served:
                raise RuntimeError("a Worker runs once; create another to run again")
            self._served = True
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="capibara-io")
        loop_thread = None
        if own_loop and any(s.is_async for s in self._specs.values()):
            loop_thread = self._start_loop()
        try:
            self._register()
            lease_threads = [threading.Thread(target=self._lease_loop, name=f"capibara-lease-{i + 1}", daemon=True)
                             for i in range(self.LEASES_IN_FLIGHT)]
            monitor = threading.Thread(target=self._monitor_loop, name="capibara-monitor", daemon=True)
            for t in lease_threads:
                t.start()
            monitor.start()
            self.ready.set()
            while not self._stop.wait(0.5):
                pass
            log.info("capibara: worker %s stopping", self.worker_id)
            self._drain(lease_threads)
            self._done.set()
            monitor.join(timeout=5)
            self._io.shutdown(wait=True)  # queued reports (async handlers', timeouts') go out
            self._deregister()
        finally:
            self._done.set()
            self._threads.close()
            if loop_thread is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                loop_thread.join(timeout=5)
                self._loop = None
            self._io.shutdown(wait=True)

    def _start_loop(self) -> threading.Thread:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            ready.set()
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        t = threading.Thread(target=main, name="capibara-async", daemon=True)
        t.start()
        ready.wait()
        return t

    def _register(self) -> None:
        reg = self.client.register_worker(
            [s.declaration() for s in self._specs.values()],
            queues=self.queues,
            concurrency=self.concurrency,
            name=self.name or f"{socket.gethostname()}-{os.getpid()}"[:100],
            labels=self.labels,
            version=self.version,
        )
        self._registration = reg
        self.worker_id = reg["id"]
        log.info("capibara: worker %s registered for %s", self.worker_id, ", ".join(self._specs))

    def _deregister(self) -> None:
        if self.worker_id is None:
            return
        try:
            self.client.deregister_worker(self.worker_id)
        except CapibaraError as e:
            log.warning("capibara: deregistering worker %s failed: %s", self.worker_id, e)

    @property
    def _heartbeat_every(self) -> float:
        if self.heartbeat_s:
            return float(self.heartbeat_s)
        return float(self._registration.get("heartbeat_s") or 10.0)

    # Leasing.

    def _free(self) -> int:
        return self.concurrency - self._active - self._asked

    def _lease_loop(self) -> None:
        """One of `LEASES_IN_FLIGHT` loops: each asks for the slots that are free and not asked
        for by the other, so that slots freed while one lease call waits for its answer (a
        claim's commit) are asked for at once instead of after it. An idle worker has one long
        poll out: the loop that asked first asked for every slot."""
        failures = 0
        while not self._stop.is_set():
            with self._cond:
                while self._free() <= 0 and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                want = min(self._free(), 100)
                self._asked += want
            leases: List[Lease] = []
            asked_as = self.worker_id
            try:
                leases = self.client.lease(asked_as or "", max_jobs=want,
                                           wait_ms=int(self.poll_s * 1000))
                failures = 0
            except (NotFound, Conflict) as e:  # unknown, or deregistered by someone else
                if self._stop.is_set():
                    return
                self._retry_register(asked_as, e)
                continue
            except Exception as e:  # never let the loop die: back off and try again
                failures += 1
                delay = min(10.0, 0.5 * 2 ** min(failures, 5))
                log.warning("capibara: lease failed (%s); retrying in %.1f s", e, delay)
                self._stop.wait(delay)
                continue
            finally:
                with self._cond:
                    # The leased jobs hold their slots from here on (`_start` runs them).
                    self._asked -= want
                    self._active += len(leases)
                    self._cond.notify_all()
            for lease in leases:
                if self._stop.is_set():
                    self._release(lease)
                    self._slot_done()
                else:
                    self._start(lease)

    def _retry_register(self, lost: Optional[str], why: BaseException) -> None:
        """Register again after registration `lost` was refused, once for both lease loops."""
        with self._registering:
            if self.worker_id != lost:  # the other loop registered again already
                return
            log.warning("capibara: worker %s: %s; registering again", lost, why)
            try:
                self._register()
            except CapibaraError as e:
                log.warning("capibara: registering failed: %s", e)
                self._stop.wait(2.0)

    def _release(self, lease: Lease) -> None:
        try:
            self.client.release(lease.job.get("id", ""), lease.token)
            log.info("capibara: released job %s", lease.job.get("id"))
        except LeaseLost:
            pass
        except CapibaraError as e:
            log.warning("capibara: releasing job %s failed: %s (its lease will expire)", lease.job.get("id"), e)

    def _start(self, lease: Lease) -> None:
        spec = self._specs.get(lease.job.get("kind", ""))
        if spec is None:
            self._io_submit(self._report_fail, lease, "unknown_kind",
                            f"this worker has no handler for kind {lease.job.get('kind')!r}", False, None)
            self._slot_done()
            return
        outbox = _Outbox(self._io) if spec.is_async and self._io is not None else None
        ctx = JobContext(self.client, lease, outbox)
        timeout = lease.job.get("timeout_s") or spec.fields.get("timeout_s")
        run = _Running(lease, spec, ctx, self._heartbeat_every, timeout)
        run.worker_id = self.worker_id or ""
        with self._cond:
            self._running[run.lease.token] = run
        if spec.is_async and self._loop is not None:
            run.future = asyncio.run_coroutine_threadsafe(self._run_async(run), self._loop)
        else:
            self._threads.submit(self._run_sync, run)

    # Handlers.

    def _run_sync(self, run: _Running) -> None:
        try:
            outcome: Tuple[bool, Any] = (True, run.spec.fn(run.ctx))
        except BaseException as e:  # the handler's failure is the job's, never the worker's
            outcome = (False, e)
        try:
            if run.claim_final():
                with self._cond:
                    self._reporting += 1
                    self._free_slot(run)  # the handler is done: the report goes on without it
                try:
                    self._report(run, outcome)
                finally:
                    with self._cond:
                        self._reporting -= 1
        finally:
            self._finished(run)

    async def _run_async(self, run: _Running) -> None:
        try:
            outcome: Tuple[bool, Any] = (True, await run.spec.fn(run.ctx))
        except BaseException as e:
            outcome = (False, e)
        if run.claim_final():
            assert run.ctx._outbox is not None
            with self._cond:
                self._free_slot(run)
            run.ctx._outbox.put(lambda: self._finish_after_report(run, outcome))
        else:
            self._finished(run)

    def _finish_after_report(self, run: _Running, outcome: Tuple[bool, Any]) -> None:
        try:
            self._report(run, outcome)
        finally:
            self._finished(run)

    def _slot_done(self) -> None:
        """A leased job that never ran gives its slot back."""
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _free_slot(self, run: _Running) -> None:
        """Count the job's handler as done (under `_cond`): another job may start."""
        if not run.slot_freed:
            run.slot_freed = True
            self._active -= 1
            self._cond.notify_all()

    def _finished(self, run: _Running) -> None:
        with self._cond:
            self._running.pop(run.lease.token, None)
            self._free_slot(run)

    def _report(self, run: _Running, outcome: Tuple[bool, Any]) -> None:
        """The job's one final report: complete or fail."""
        ok, value = outcome
        ctx = run.ctx
        if ctx.cancel_reason == "lease_lost":
            return
        job_id, token = run.id, run.lease.token
        try:
            if run.cancel_requested:
                self._fail(job_id, token, "canceled", "canceled while running", retryable=False)
            elif ok:
                try:
                    json.dumps(value)
                except (TypeError, ValueError) as e:
                    self._fail(job_id, token, "invalid_output", f"the output is not JSON: {e}", retryable=False)
                    return
                try:
                    self._completions.complete(run.worker_id, job_id, token, value)
                except ValidationError as e:
                    self._fail(job_id, token, "invalid_output", e.detail or str(e), retryable=False)
            else:
                err: BaseException = value
                if isinstance(err, Fatal):
                    self._fail(job_id, token, err.type, err.message or str(err), retryable=False)
                elif isinstance(err, RetryAfter):
                    self._fail(job_id, token, err.type, err.message or str(err), retry_after_s=err.seconds)
                elif isinstance(err, (Cancelled, asyncio.CancelledError)):
                    self._fail(job_id, token, "canceled", str(err) or "canceled", retryable=False)
                else:
                    log.warning("capibara: job %s (attempt %s) raised %r", job_id, ctx.attempt, err)
                    self._fail(job_id, token, type(err).__name__, str(err) or repr(err))
        except LeaseLost:
            log.warning("capibara: job %s lost its lease before its result was recorded; dropped", job_id)
        except CapibaraError as e:
            log.error("capibara: reporting job %s failed: %s (its lease will expire and it runs again)", job_id, e)

    def _fail(self, job_id: str, token: str, type_: str, message: str, *, retryable: bool = True,
              retry_after_s: Optional[float] = None) -> None:
        self.client.fail(job_id, token, clip(type_ or "error", 100), clip(message, 10000),
                         retryable=retryable, retry_after_s=retry_after_s)

    def _report_fail(self, lease: Lease, type_: str, message: str, retryable: bool,
                     retry_after_s: Optional[float]) -> None:
        try:
            self._fail(lease.job.get("id", ""), lease.token, type_, message,
                             retryable=retryable, retry_after_s=retry_after_s)
        except LeaseLost:
            log.warning("capibara: job %s lost its lease; dropped", lease.job.get("id"))
        except CapibaraError as e:
            log.error("capibara: reporting job %s failed: %s", lease.job.get("id"), e)

    def _io_submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._io is not None:
            try:
                self._io.submit(fn, *args)
            except RuntimeError:  # shut down: the worker is stopping
                pass

    def _interrupt(self, run: _Running, reason: str) -> None:
        """Tell the handler to stop: its `cancelled` flag, and an async handler's task."""
        run.ctx._set_cancelled(reason)
        if run.future is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(run.future.cancel)

    # Heartbeats, cancels and timeouts.

    def _monitor_loop(self) -> None:
        while not self._done.wait(0.1):
            now = time.monotonic()
            with self._cond:
                runs = list(self._running.values())
            for run in runs:
                if run.finalized:
                    continue
                if run.deadline is not None and now >= run.deadline and run.claim_final():
                    log.warning("capibara: job %s timed out after %s s", run.id, run.timeout_s)
                    self._interrupt(run, "timeout")
                    self._io_submit(self._report_fail, run.lease, "timeout",
                                    f"the attempt exceeded its timeout of {run.timeout_s} s", True, None)
                    continue
                if now >= run.next_heartbeat and not run.heartbeat_busy:
                    run.heartbeat_busy = True
                    run.next_heartbeat = now + self._heartbeat_every
                    self._io_submit(self._heartbeat, run)

    def _heartbeat(self, run: _Running) -> None:
        try:
            if run.finalized:
                return
            answer = self.client.heartbeat(run.id, run.lease.token)
            if answer.get("cancel_requested") and not run.cancel_requested:
                log.info("capibara: job %s: cancel requested", run.id)
                run.cancel_requested = True
                self._interrupt(run, "canceled")
        except LeaseLost:
            if run.claim_final():
                log.warning("capibara: job %s lost its lease; stopping its handler", run.id)
                self._interrupt(run, "lease_lost")
        except CapibaraError as e:
            log.warning("capibara: heartbeat of job %s failed: %s", run.id, e)
        finally:
            run.heartbeat_busy = False

    # Shutdown.

    def _drain(self, lease_threads: List[threading.Thread]) -> None:
        deadline = time.monotonic() + self.grace_s
        with self._cond:
            while not self._force.is_set() and any(not r.finalized for r in self._running.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        # The last long poll returns (what it brings is released) before handlers are released,
        # so that a released job is not leased again by this worker.
        if not self._force.is_set():
            end = time.monotonic() + self.poll_s + self.client._http.timeout + 5
            for t in lease_threads:
                t.join(timeout=max(0.0, end - time.monotonic()))
        with self._cond:
            left_over = [r for r in self._running.values() if not r.finalized]
        for run in left_over:
            if run.claim_final():
                log.info("capibara: job %s still running after the grace period; releasing it", run.id)
                self._interrupt(run, "shutdown")
                self._release(run.lease)
        # Final reports under way on handler threads finish before the worker deregisters.
        end = time.monotonic() + 10
        with self._cond:
            while self._reporting and time.monotonic() < end:
                self._cond.wait(0.1)
