"""SSE streaming of a job's events, live, with resume by `Last-Event-ID`."""

from __future__ import annotations

import threading
import time
from typing import Any

from _support import ServerTestCase, capibara, requires_server


@requires_server
class StreamTest(ServerTestCase):
    def test_live_stream_resumes_after_the_last_event_without_gap_or_duplicate(self) -> None:
        kind = self.kind()
        go = threading.Event()
        w = self.worker()

        @w.handler(kind)
        def steps(job: capibara.JobContext) -> Any:
            go.wait(10)  # the stream is open before anything happens
            for i in range(1, 5):
                job.progress(i * 20, f"step {i}")
                time.sleep(0.1)
            return {"steps": 4}

        self.start_worker(w)
        job = self.client.submit(kind)
        first = []
        stream = self.client.stream(job.id)
        for event in stream:
            first.append(event)
            if event.type == "JobStarted":
                go.set()
            if event.type == "JobProgress" and len([e for e in first if e.type == "JobProgress"]) == 2:
                break
        stream.close()  # drop the connection mid-job
        self.assertEqual(first[0].type, "JobSubmitted")
        rest = list(self.client.stream(job.id, last_event_id=first[-1].id))
        self.assertEqual(rest[-1].type, "JobSucceeded")
        self.assertEqual(rest[-1].data.get("output"), {"steps": 4})
        everything = self.client.events(job.id)
        self.assertEqual([e.id for e in first + rest], [e.id for e in everything])
        self.assertEqual([e.version for e in first + rest], list(range(1, len(everything) + 1)))
        messages = [e.data.get("message") for e in first + rest if e.type == "JobProgress"]
        self.assertEqual(messages, ["step 1", "step 2", "step 3", "step 4"])

    def test_resume_after_the_terminal_event_ends_at_once(self) -> None:
        job = self.client.submit("echo", {"x": 1}, wait=20)
        events = list(self.client.stream(job.id))
        self.assertEqual(events[-1].type, "JobSucceeded")
        started = time.monotonic()
        self.assertEqual(list(self.client.stream(job.id, last_event_id=events[-1].id)), [])
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual([e.id for e in self.client.events(job.id, after=events[0].id)],
                         [e.id for e in events[1:]])
