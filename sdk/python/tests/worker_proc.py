"""A worker process for the tests: `python worker_proc.py --kind K [--grace S] [--sleep S]
[--hang-first]`. It prints `registered <worker id>`, `started <job id> <attempt>` for each job
and `stopped` once `run()` returns (on SIGTERM/SIGINT)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import Any

import capibara


_out = threading.Lock()


def say(line: str) -> None:
    """One whole line at a time: print() writes the text and the newline separately, so lines
    printed from a handler thread and the announcing thread could interleave."""
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True)
    ap.add_argument("--grace", type=float, default=30.0)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds each job takes")
    ap.add_argument("--hang-first", action="store_true", help="attempt 1 never ends")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    worker = capibara.Worker(concurrency=4, grace_s=args.grace, poll_s=1.0, name=f"sdk-proc-{os.getpid()}")

    @worker.handler(args.kind)
    def handle(job: capibara.JobContext) -> Any:
        say(f"started {job.id} {job.attempt}")
        if args.hang_first and job.attempt == 1:
            time.sleep(3600)
        end = time.monotonic() + args.sleep
        while time.monotonic() < end:
            if job.wait_cancelled(0.05):
                say(f"interrupted {job.id} {job.cancel_reason}")
                job.check_cancelled()
        say(f"finished {job.id} {job.attempt}")
        return {"attempt": job.attempt, "pid": os.getpid()}

    def announce() -> None:
        worker.ready.wait()
        say(f"registered {worker.worker_id}")

    threading.Thread(target=announce, daemon=True).start()
    worker.run()
    say("stopped")


if __name__ == "__main__":
    main()
