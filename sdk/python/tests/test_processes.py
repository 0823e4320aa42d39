"""SDK workers as separate processes: a SIGKILLed worker's job runs again; SIGTERM shuts down
gracefully (stops leasing, lets the running handler finish within the grace period, or
releases it) and loses nothing."""

from __future__ import annotations

import signal

from _support import FAST_BACKOFF, ServerTestCase, WorkerProcess, requires_server


@requires_server
class ProcessTest(ServerTestCase):
    def spawn(self, kind: str, *args: str) -> WorkerProcess:
        p = WorkerProcess(kind, *args)
        self.addCleanup(p.kill)
        p.wait_line("registered ")
        return p

    def test_a_sigkilled_workers_job_runs_again_on_attempt_two(self) -> None:
        kind = self.kind()
        first = self.spawn(kind, "--hang-first")
        job = self.client.submit(kind, max_attempts=3, backoff=FAST_BACKOFF)
        self.assertEqual(first.wait_line(f"started {job.id}"), f"started {job.id} 1")
        first.signal(signal.SIGKILL)
        first.wait(5)
        second = self.spawn(kind)
        done = self.client.wait(job.id, timeout=30)
        self.assertEqual((done.status, done.attempt), ("succeeded", 2))
        self.assertEqual(done.output, {"attempt": 2, "pid": second.proc.pid})
        failed = [e.data for e in self.client.events(job.id) if e.type == "JobAttemptFailed"]
        self.assertEqual([f["error"]["type"] for f in failed], ["worker_lost"])

    def test_sigterm_lets_the_running_handler_finish_and_stops_leasing(self) -> None:
        kind = self.kind()
        # The handler outlives the 3 s lease: it succeeds on attempt 1 only if heartbeats renew it.
        w = self.spawn(kind, "--sleep", "4", "--grace", "20")
        job = self.client.submit(kind)
        w.wait_line(f"started {job.id}")
        w.signal(signal.SIGTERM)
        later = self.client.submit(kind)  # submitted after SIGTERM: not for this worker
        self.assertEqual(w.wait(20), 0)
        self.assertIn("stopped", w.lines)
        done = self.client.get(job.id)
        self.assertEqual((done.status, done.attempt, done.output), ("succeeded", 1, {"attempt": 1, "pid": w.proc.pid}))
        self.assertFalse([l for l in w.lines if l.startswith(f"started {later.id}")])
        self.assertEqual(self.client.get(later.id).status, "queued")
        # Another worker takes it: nothing was lost.
        self.spawn(kind)
        self.assertEqual(self.client.wait(later.id, timeout=20).status, "succeeded")

    def test_sigterm_releases_a_handler_that_outlives_the_grace_period(self) -> None:
        kind = self.kind()
        w = self.spawn(kind, "--sleep", "60", "--grace", "1")
        job = self.client.submit(kind, max_attempts=1)
        w.wait_line(f"started {job.id}")
        w.signal(signal.SIGTERM)
        self.assertEqual(w.wait(20), 0)
        # Released at once (not left to expire): queued again, its only attempt not used up.
        self.assertEqual(self.client.get(job.id).status, "queued")
        queued = [e.data for e in self.client.events(job.id) if e.type == "JobQueued"]
        self.assertIn("released", [q.get("reason") for q in queued])
        self.spawn(kind)
        done = self.client.wait(job.id, timeout=20)
        self.assertEqual(done.status, "succeeded")
