"""No-op worker of `capibara-bench sdk`: the Python SDK's `Worker` with one handler that returns
its input. Run with `sdk/python/src` on PYTHONPATH and CAPIBARA_URL / CAPIBARA_API_KEY set:

    python3 python_noop.py --kind bench.noop-python --concurrency 32

It prints `bench-driver ready <worker id>` once registered and runs until SIGTERM or SIGINT.
The SDK is used as documented, with its defaults (sync handler on threads, 5 s long polls)."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any

import capibara


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    worker = capibara.Worker(concurrency=args.concurrency, name=f"bench-python-{os.getpid()}")

    @worker.handler(args.kind)
    def noop(job: capibara.JobContext) -> Any:
        return job.input

    def announce() -> None:
        worker.ready.wait()
        print(f"bench-driver ready {worker.worker_id}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    worker.run()
    print("bench-driver stopped", flush=True)


if __name__ == "__main__":
    main()
