"""The client and the worker against an in-memory fake of the API (tests/fake_server.py): the
SDK's own logic (retries, SSE resume, the worker loop, shutdown) without a real server."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import unittest
from typing import Any, Callable, List

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import capibara  # noqa: E402
from fake_server import FakeServer  # noqa: E402


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class FakeTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.server = FakeServer(lease_s=1.5).__enter__()
        self.addCleanup(self.server.__exit__)
        self.client = capibara.Client(self.server.url, "test-key")
        self.addCleanup(self.client.close)

    def start_worker(self, worker: capibara.Worker) -> threading.Thread:
        t = threading.Thread(target=worker.run, daemon=True)
        t.start()
        eventually(lambda: worker.worker_id)

        def stop() -> None:
            worker.stop()
            worker.stop()
            t.join(10)

        self.addCleanup(stop)
        return t

    def worker(self, **kw: Any) -> capibara.Worker:
        kw.setdefault("poll_s", 0.5)
        return capibara.Worker(self.client, **kw)

    def types(self, job_id: str) -> List[str]:
        return [e.type for e in self.client.events(job_id)]


class TransportTest(FakeTestCase):
    def test_idempotent_calls_retry_503_others_do_not(self) -> None:
        job = self.client.submit("k")  # carries an Idempotency-Key: retried
        self.server.state.fail_next = [503, 503]
        self.assertEqual(self.client.get(job.id).id, job.id)
        self.server.state.fail_next = [503]
        with self.assertRaises(capibara.Unavailable):
            self.client.lease("nobody")  # a lease is never repeated
        self.server.state.fail_next = [429]
        self.assertEqual(self.client.submit("k").kind, "k")  # 429: refused before anything happened

    def test_typed_errors(self) -> None:
        with self.assertRaises(capibara.NotFound):
            self.client.get("nope")
        with self.assertRaises(capibara.ValidationError) as cm:
            self.client.request("POST", "/v1/jobs", json={})
        self.assertEqual(cm.exception.field, "kind")
        with self.assertRaises(capibara.Unauthorized), capibara.Client(self.server.url, "wrong") as other:
            other.get("x")
        with self.assertRaises(capibara.TransportError):
            capibara.Client("http://127.0.0.1:9", "k", max_retries=0).get("x")

    def test_wait_times_out_with_the_job(self) -> None:
        job = self.client.submit("nobody.runs.this")
        with self.assertRaises(capibara.WaitTimeout) as cm:
            self.client.wait(job.id, timeout=0.3)
        self.assertEqual(cm.exception.resource["status"], "queued")


class StreamTest(FakeTestCase):
    def test_reconnects_after_a_broken_connection_without_gap_or_duplicate(self) -> None:
        w = self.worker()

        @w.handler("steps")
        def steps(job: capibara.JobContext) -> Any:
            for i in range(4):
                job.progress(i * 25)
                time.sleep(0.05)
            return "done"

        job = self.client.submit("steps")
        self.server.state.drop_sse_after = 3
        self.start_worker(w)
        seen = list(self.client.stream(job.id))
        ids = [e.id for e in seen]
        self.assertEqual(ids, [e.id for e in self.client.events(job.id)])
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(seen[-1].type, "JobSucceeded")
        resumed = list(self.client.stream(job.id, last_event_id=ids[2]))
        self.assertEqual([e.id for e in resumed], ids[3:])

    def test_async_stream(self) -> None:
        job = self.client.submit("k")
        sid = self.server.state
        with sid.cond:
            sid.append(job.id, "JobCanceled", {})

        async def collect() -> List[str]:
            ac = capibara.AsyncClient(client=self.client)
            return [e.type async for e in ac.stream(job.id)]

        self.assertEqual(asyncio.run(collect()), ["JobSubmitted", "JobCanceled"])


class WorkerTest(FakeTestCase):
    def test_outputs_progress_logs_chunks_and_failures(self) -> None:
        w = self.worker(concurrency=4)

        @w.handler("ok", timeout_s=5)
        def ok(job: capibara.JobContext) -> Any:
            job.progress(50, "half", {"x": 1})
            job.log("hello", "warning")
            job.chunk("a")
            job.chunk("b")
            return {"doubled": job.input["n"] * 2, "attempt": job.attempt}

        @w.handler("flaky")
        def flaky(job: capibara.JobContext) -> Any:
            if job.attempt == 1:
                raise KeyError("first")
            return job.attempt

        @w.handler("fatal")
        def fatal(job: capibara.JobContext) -> Any:
            raise capibara.Fatal("no way", type="bad_input")

        @w.handler("aio")
        async def aio(job: capibara.JobContext) -> Any:
            job.progress(10)
            await asyncio.sleep(0.01)
            return "async"

        self.start_worker(w)
        a = self.client.submit("ok", {"n": 21}, wait=5)
        self.assertEqual(a.status, "succeeded")
        self.assertEqual(a.output, {"doubled": 42, "attempt": 1})
        evs = self.client.events(a.id)
        self.assertEqual([e.data for e in evs if e.type == "JobOutputChunk"],
                         [{"seq": 0, "data": "a"}, {"seq": 1, "data": "b"}])
        self.assertIn({"level": "warn", "message": "hello"}, [e.data for e in evs if e.type == "JobLog"])
        self.assertEqual(a.progress, {"percent": 50, "message": "half", "data": {"x": 1}})
        b = self.client.submit("flaky", wait=5)
        self.assertEqual((b.status, b.output, b.attempt), ("succeeded", 2, 2))
        failed = [e.data for e in self.client.events(b.id) if e.type == "JobAttemptFailed"]
        self.assertEqual(failed[0]["error"]["type"], "KeyError")
        c = self.client.submit("fatal", wait=5)
        self.assertEqual((c.status, c.attempt, c.error["type"]), ("failed", 1, "bad_input"))
        d = self.client.submit("aio", wait=5)
        self.assertEqual((d.status, d.output), ("succeeded", "async"))
        self.assertIn("JobProgress", self.types(d.id))

    def test_cancel_reaches_sync_and_async_handlers(self) -> None:
        w = self.worker()
        saw = threading.Event()

        @w.handler("loop")
        def loop(job: capibara.JobContext) -> Any:
            while not job.wait_cancelled(0.02):
                pass
            saw.set()
            job.check_cancelled()

        @w.handler("sleepy")
        async def sleepy(job: capibara.JobContext) -> Any:
            await asyncio.sleep(30)

        self.start_worker(w)
        for kind in ("loop", "sleepy"):
            job = self.client.submit(kind)
            eventually(lambda: self.client.get(job.id).status == "running")
            self.client.cancel(job.id)
            done = self.client.wait(job.id, timeout=5)
            self.assertEqual(done.status, "canceled", kind)
        self.assertTrue(saw.is_set())

    def test_timeout_is_enforced(self) -> None:
        w = self.worker()

        @w.handler("slow", timeout_s=1)
        async def slow(job: capibara.JobContext) -> Any:
            await asyncio.sleep(30)

        self.start_worker(w)
        job = self.client.submit("slow", max_attempts=1)
        done = self.client.wait(job.id, timeout=5)
        self.assertEqual((done.status, done.error["type"]), ("failed", "timeout"))

    def test_successes_finishing_together_are_sent_in_one_batch(self) -> None:
        w = self.worker(concurrency=8)
        gate = threading.Barrier(8)

        @w.handler("together")
        def together(job: capibara.JobContext) -> Any:
            gate.wait(5)  # all eight finish at the same moment
            return job.input["n"]

        self.start_worker(w)
        jobs = [self.client.submit("together", {"n": i}) for i in range(8)]
        done = [self.client.wait(j.id, timeout=10) for j in jobs]
        self.assertEqual([d.output for d in done], list(range(8)))
        batches = self.server.state.batches
        self.assertEqual(sum(batches), 8, batches)
        self.assertLess(len(batches), 8, f"no two successes shared a request: {batches}")
        self.assertEqual([self.types(j.id).count("JobSucceeded") for j in jobs], [1] * 8)

    def test_two_lease_calls_go_out_together_and_never_ask_for_more_than_the_free_slots(self) -> None:
        self.server.state.lease_delay_s = 0.05  # each answer waits, as for a claim's commit
        w = self.worker(concurrency=4)
        lock = threading.Lock()
        running, most = [0], [0]

        @w.handler("quick")
        def quick(job: capibara.JobContext) -> Any:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.01 * (job.input["n"] % 3))
            with lock:
                running[0] -= 1
            return job.input["n"]

        self.start_worker(w)
        jobs = [self.client.submit("quick", {"n": i}) for i in range(40)]
        done = [self.client.wait(j.id, timeout=20) for j in jobs]
        self.assertEqual([d.output for d in done], list(range(40)))
        st = self.server.state
        self.assertEqual(st.most_lease_calls, 2, "slots freed during a lease call wait for it")
        self.assertLessEqual(st.most_asked, 4, "lease calls together asked for more than the free slots")
        self.assertLessEqual(most[0], 4)

    def test_handler_threads_are_kept_from_one_job_to_the_next(self) -> None:
        w = self.worker(concurrency=4)
        names = set()

        @w.handler("which")
        def which(job: capibara.JobContext) -> Any:
            names.add(threading.current_thread().name)
            return None

        self.start_worker(w)
        for i in range(20):
            self.client.wait(self.client.submit("which", {"n": i}).id, timeout=10)
        self.assertLessEqual(len(names), 4, names)

    def test_a_handler_that_never_returns_holds_only_its_own_thread(self) -> None:
        w = self.worker(concurrency=2)
        release = threading.Event()
        self.addCleanup(release.set)

        @w.handler("stuck")
        def stuck(job: capibara.JobContext) -> Any:
            release.wait(30)

        @w.handler("quick")
        def quick(job: capibara.JobContext) -> Any:
            return job.input["n"]

        self.start_worker(w)
        held = self.client.submit("stuck")
        eventually(lambda: self.client.get(held.id).status == "running")
        for i in range(5):
            self.assertEqual(self.client.wait(self.client.submit("quick", {"n": i}).id, timeout=10).output, i)

    def test_a_lost_lease_drops_the_result_and_the_worker_goes_on(self) -> None:
        w = self.worker(heartbeat_s=60)  # no heartbeat: the 1.5 s lease expires
        calls: List[Any] = []

        @w.handler("late")
        def late(job: capibara.JobContext) -> Any:
            if job.attempt == 1 and job.id not in calls:
                calls.append(job.id)
                time.sleep(2.5)
                calls.append("stale returned")
                return "stale"
            return "fresh"

        self.start_worker(w)
        job = self.client.submit("late")
        done = self.client.wait(job.id, timeout=10)
        self.assertEqual((done.status, done.output, done.attempt), ("succeeded", "fresh", 2))
        eventually(lambda: "stale returned" in calls, 5)
        time.sleep(0.2)
        self.assertEqual(self.types(job.id).count("JobSucceeded"), 1)
        self.assertEqual(self.client.get(job.id).output, "fresh")
        self.assertEqual(self.client.submit("late", wait=5).output, "fresh")  # still working

    def test_stop_waits_for_running_handlers_then_releases_the_rest(self) -> None:
        w = self.worker(grace_s=5)

        running = threading.Event()

        @w.handler("short")
        def short(job: capibara.JobContext) -> Any:
            running.set()
            time.sleep(0.5)
            return "finished"

        t = self.start_worker(w)
        job = self.client.submit("short")
        self.assertTrue(running.wait(5))
        w.stop()
        queued = self.client.submit("short")
        t.join(10)
        self.assertFalse(t.is_alive())
        self.assertEqual(self.client.get(job.id).output, "finished")
        self.assertEqual(self.client.get(queued.id).status, "queued")
        self.assertEqual(self.server.state.workers[w.worker_id]["status"], "stopped")

        def releases() -> int:
            return sum(1 for e in self.client.events(queued.id) if e.data == {"reason": "released"})

        before = releases()  # the first worker may have leased it while stopping, then released it
        w2 = self.worker(grace_s=0.3)
        started = threading.Event()

        @w2.handler("short")
        def long(job: capibara.JobContext) -> Any:
            started.set()
            job.wait_cancelled(10)
            return "too late"

        t2 = self.start_worker(w2)
        started.wait(5)
        w2.stop()
        t2.join(10)
        self.assertFalse(t2.is_alive())
        after = self.client.get(queued.id)
        self.assertEqual((after.status, after.attempt), ("queued", 0))
        self.assertEqual(releases(), before + 1)


if __name__ == "__main__":
    unittest.main()
