"""The Python SDK worker of docs/examples/mixed-workers: runs the kind `demo.describe`.

Run it with the SDK on the path (`pip install ./sdk/python`, or PYTHONPATH=sdk/python/src) and
CAPIBARA_URL / CAPIBARA_API_KEY set: `python3 docs/examples/mixed-workers/worker.py`.
"""

from capibara import Worker

worker = Worker(concurrency=4, name="describe")


@worker.handler(
    "demo.describe",
    input_schema={
        "type": "object",
        "required": ["n", "total"],
        "properties": {"n": {"type": "integer", "minimum": 1}, "total": {"type": "number"}},
    },
)
def describe(job):
    n, total = job.input["n"], job.input["total"]
    job.progress(100, "described")
    return {"text": f"{n} values, total {total}, mean {total / n:.2f}"}


if __name__ == "__main__":
    worker.run()
