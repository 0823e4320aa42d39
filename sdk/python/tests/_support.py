"""Helpers of the tests that run against a real Capibara server (`CAPIBARA_URL`,
`CAPIBARA_API_KEY`: an admin key of namespace `default`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import unittest
import uuid
from typing import Any, Callable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)

import capibara  # noqa: E402

SERVER = os.environ.get("CAPIBARA_URL")
requires_server = unittest.skipUnless(
    SERVER, "CAPIBARA_URL is not set: the tests against a real server are skipped"
)

# Retries come quickly in tests (the server's backoff default starts at 1 s).
FAST_BACKOFF = {"initial_ms": 100, "factor": 1, "max_ms": 100}


def unique_kind(prefix: str = "sdkpy") -> str:
    return f"{prefix}.t{uuid.uuid4().hex[:12]}"


def eventually(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(every)


class ServerTestCase(unittest.TestCase):
    """A client for the server; `start_worker` runs a `Worker` on a thread until the test ends."""

    def setUp(self) -> None:
        self.client = capibara.Client()
        self.addCleanup(self.client.close)

    def kind(self) -> str:
        """A kind name of this test only, deleted when the test ends."""
        name = unique_kind()

        def delete() -> None:
            try:
                self.client.delete_kind(name)
            except capibara.NotFound:
                pass

        self.addCleanup(delete)
        return name

    def worker(self, **kw: Any) -> capibara.Worker:
        kw.setdefault("poll_s", 1.0)
        kw.setdefault("grace_s", 5.0)
        kw.setdefault("name", f"sdk-test-{self._testMethodName}"[:100])
        return capibara.Worker(self.client, **kw)

    def start_worker(self, worker: capibara.Worker) -> threading.Thread:
        errors: List[BaseException] = []

        def run() -> None:
            try:
                worker.run()
            except BaseException as e:  # surfaced by the cleanup
                errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        eventually(lambda: worker.worker_id or errors, timeout=10)
        if errors:
            raise errors[0]

        def stop() -> None:
            worker.stop()
            t.join(20)
            self.assertFalse(t.is_alive(), "the worker did not stop")
            if errors:
                raise errors[0]

        self.addCleanup(stop)
        return t

    def types(self, job_id: str) -> List[str]:
        return [e.type for e in self.client.events(job_id)]


class WorkerProcess:
    """`tests/worker_proc.py` in a subprocess; its stdout lines are collected as they come."""

    def __init__(self, kind: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "worker_proc.py"), "--kind", kind, *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: List[str] = []
        self.stderr: List[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True).start()

    def _read(self, stream: Any, into: List[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_line(self, prefix: str, timeout: float = 15.0) -> str:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                if self.proc.poll() is not None:
                    end = min(end, time.monotonic() + 1.0)  # what it printed is still being read
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no line {prefix!r} from the worker; stdout={self.lines} "
                        f"stderr tail={self.stderr[-15:]}"
                    )
                self._cond.wait(min(left, 0.1))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def wait_status(client: capibara.Client, job_id: str, statuses: Any, timeout: float = 10.0) -> Optional[capibara.Job]:
    return eventually(lambda: (lambda j: j if j.status in statuses else None)(client.get(job_id)), timeout)
