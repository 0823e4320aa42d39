"""The worker against a real server: progress, logs and chunks; cancel reaching a running
handler (sync and async); retries; `Fatal`; `RetryAfter`; timeouts; declared kinds."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Dict, List

from _support import FAST_BACKOFF, ServerTestCase, capibara, requires_server, wait_status


@requires_server
class WorkerTest(ServerTestCase):
    def test_runs_jobs_with_progress_logs_and_chunks(self) -> None:
        kind = self.kind()
        w = self.worker(concurrency=8)

        @w.handler(kind, input_schema={"type": "object", "required": ["n"],
                                       "properties": {"n": {"type": "integer"}}})
        def double(job: capibara.JobContext) -> Any:
            job.progress(50, "half way", {"n": job.input["n"]})
            job.log("hello from the handler", level="warn")
            job.chunk({"part": 1})
            job.chunk({"part": 2})
            return {"doubled": job.input["n"] * 2, "attempt": job.attempt}

        self.start_worker(w)
        # The decorator declared the kind with its schema.
        with self.assertRaises(capibara.ValidationError) as cm:
            self.client.submit(kind, {"n": "x"})
        self.assertEqual(cm.exception.field, "input.n")
        jobs = [self.client.submit(kind, {"n": i}) for i in range(6)]
        done = [self.client.wait(j.id, timeout=20) for j in jobs]
        self.assertEqual([d.output for d in done], [{"doubled": 2 * i, "attempt": 1} for i in range(6)])
        evs = self.client.events(jobs[3].id)
        types = [e.type for e in evs]
        self.assertEqual(types[-1], "JobSucceeded")
        progress = [e.data for e in evs if e.type == "JobProgress"]
        self.assertEqual(progress, [{"percent": 50, "message": "half way", "data": {"n": 3}}])
        self.assertIn({"level": "warn", "message": "hello from the handler"},
                      [e.data for e in evs if e.type == "JobLog"])
        self.assertEqual([e.data for e in evs if e.type == "JobOutputChunk"],
                         [{"seq": 0, "data": {"part": 1}}, {"seq": 1, "data": {"part": 2}}])
        self.assertEqual(done[3].progress.get("message"), "half way")

    def test_cancel_reaches_a_running_sync_handler(self) -> None:
        kind = self.kind()
        saw: Dict[str, Any] = {}
        started = threading.Event()
        w = self.worker()

        @w.handler(kind)
        def loop(job: capibara.JobContext) -> Any:
            started.set()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if job.cancelled:
                    saw["reason"] = job.cancel_reason
                    job.check_cancelled()
                time.sleep(0.05)
            return "not canceled"

        self.start_worker(w)
        job = self.client.submit(kind)
        self.assertTrue(started.wait(10))
        # Claimed 250 ms after its lease (no report came first): a running attempt to cancel.
        # (One canceled sooner is canceled at once, and its handler told its lease is lost.)
        wait_status(self.client, job.id, {"running"})
        self.assertEqual(self.client.cancel(job.id).cancel_requested, True)
        done = self.client.wait(job.id, timeout=15)
        self.assertEqual(done.status, "canceled")
        self.assertEqual(saw.get("reason"), "canceled")
        self.assertIn("JobCanceled", self.types(job.id))

    def test_cancel_cancels_an_async_handler_task(self) -> None:
        kind = self.kind()
        cancelled = threading.Event()
        w = self.worker()

        @w.handler(kind)
        async def sleepy(job: capibara.JobContext) -> Any:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "slept"

        self.start_worker(w)
        job = self.client.submit(kind)
        wait_status(self.client, job.id, {"running"})
        self.client.cancel(job.id)
        self.assertEqual(self.client.wait(job.id, timeout=15).status, "canceled")
        self.assertTrue(cancelled.is_set())

    def test_a_raising_handler_is_retried_and_attempt_two_succeeds(self) -> None:
        kind = self.kind()
        w = self.worker()
        attempts: List[int] = []

        @w.handler(kind)
        def flaky(job: capibara.JobContext) -> Any:
            attempts.append(job.attempt)
            if job.attempt == 1:
                raise ValueError("first attempt fails")
            return {"attempt": job.attempt}

        self.start_worker(w)
        job = self.client.submit(kind, max_attempts=3, backoff=FAST_BACKOFF)
        done = self.client.wait(job.id, timeout=20)
        self.assertEqual((done.status, done.attempt, done.output), ("succeeded", 2, {"attempt": 2}))
        self.assertEqual(attempts, [1, 2])
        failed = [e.data for e in self.client.events(job.id) if e.type == "JobAttemptFailed"]
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0]["error"]["type"], "ValueError")
        self.assertEqual(failed[0]["error"]["message"], "first attempt fails")

    def test_fatal_retry_after_and_timeout(self) -> None:
        fatal, later, slow = self.kind(), self.kind(), self.kind()
        w = self.worker()

        @w.handler(fatal)
        def no(job: capibara.JobContext) -> Any:
            raise capibara.Fatal("bad input", type="bad_input")

        @w.handler(later)
        def again(job: capibara.JobContext) -> Any:
            if job.attempt == 1:
                raise capibara.RetryAfter(0.2, "busy upstream")
            return "ok"

        @w.handler(slow, timeout_s=1)
        async def too_slow(job: capibara.JobContext) -> Any:
            await asyncio.sleep(30)

        self.start_worker(w)
        a = self.client.submit(fatal, max_attempts=5)
        b = self.client.submit(later, max_attempts=2)
        c = self.client.submit(slow, max_attempts=1)
        a, b, c = (self.client.wait(j.id, timeout=20) for j in (a, b, c))
        self.assertEqual((a.status, a.attempt, a.error["type"]), ("failed", 1, "bad_input"))
        self.assertEqual((b.status, b.attempt, b.output), ("succeeded", 2, "ok"))
        self.assertEqual((c.status, c.error["type"]), ("failed", "timeout"))


@requires_server
class WorkerLifecycleTest(ServerTestCase):
    def test_run_async_runs_async_handlers_on_the_callers_loop(self) -> None:
        kind = self.kind()
        w = self.worker()
        loops = []

        @w.handler(kind)
        async def handle(job: capibara.JobContext) -> Any:
            loops.append(asyncio.get_running_loop())
            job.progress(10, "async progress")
            await asyncio.sleep(0.05)
            return {"n": job.input["n"] + 1}

        async def main() -> None:
            task = asyncio.ensure_future(w.run_async())
            await asyncio.get_running_loop().run_in_executor(None, w.ready.wait, 10)
            ac = capibara.AsyncClient(client=self.client)
            jobs = await asyncio.gather(*(ac.submit(kind, {"n": i}) for i in range(4)))
            done = await asyncio.gather(*(ac.wait(j.id, 20) for j in jobs))
            self.assertEqual([d.output for d in done], [{"n": i + 1} for i in range(4)])
            self.assertEqual(set(map(id, loops)), {id(asyncio.get_running_loop())})
            task.cancel()  # stops the worker gracefully
            with self.assertRaises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        self.assertIn("async progress", [e.data.get("message") for e in self.client.events(
            self.client.list_jobs(kind=kind, limit=1)["items"][0]["id"]) if e.type == "JobProgress"])

    def test_a_worker_deregistered_behind_its_back_registers_again(self) -> None:
        kind = self.kind()
        w = self.worker()

        @w.handler(kind)
        def handle(job: capibara.JobContext) -> Any:
            return "ok"

        self.start_worker(w)
        first_id = w.worker_id
        assert first_id is not None
        self.client.deregister_worker(first_id)
        job = self.client.submit(kind)
        self.assertEqual(self.client.wait(job.id, timeout=20).output, "ok")
        self.assertNotEqual(w.worker_id, first_id)
