#!/usr/bin/env python3
"""An external trainer for Capibara's `finetune.command` jobs, in Python's standard library.

It shows the whole contract of docs/models.md ("External trainers"), the part a real trainer
(PyTorch on a GPU, …) keeps when it swaps the training for its own:

1. register as a worker of the HTTP protocol that declares `finetune.command`;
2. lease a job and heartbeat it on a thread (the answer says when a cancel was requested);
3. read the examples (inline, `examples_url`, or `examples_artifact`);
4. train, reporting progress per epoch and uploading a checkpoint every `checkpoint_every`
   steps, listed by a progress report (`data.artifacts`) so the job keeps it whatever happens;
5. upload the model file (safetensors, Capibara's classifier format) and complete with
   `{"artifact": "model.safetensors", "metrics": {...}}`: Capibara checks the file and
   registers it as the next version of the job's `name`, which `model.classify` then serves.

The training here: a softmax regression (the classification head) over all-MiniLM-L6-v2
sentence vectors, which it gets from Capibara's own `text.embed` jobs. That is what
`finetune.train` does with `freeze_encoder: true`.

    CAPIBARA_URL=http://127.0.0.1:8080 CAPIBARA_API_KEY=<worker key> \\
    CAPIBARA_SUBMIT_KEY=<submit key> python3 trainer.py [--once]

`CAPIBARA_API_KEY` needs the `worker` role; `CAPIBARA_SUBMIT_KEY` (default: the same key) the
`submit` role, for the `text.embed` jobs, and `read` for `examples_artifact`. `--once` stops
after one job. `params` of the job: `sgd_learning_rate` (default 2.0).
"""

import json
import math
import os
import random
import struct
import sys
import threading
import time
import urllib.error
import urllib.request

URL = os.environ.get("CAPIBARA_URL", "http://127.0.0.1:8080").rstrip("/")
WORKER_KEY = os.environ["CAPIBARA_API_KEY"]
SUBMIT_KEY = os.environ.get("CAPIBARA_SUBMIT_KEY", WORKER_KEY)
MODEL_FORMAT = "capibara-classifier/1"
DIMENSIONS = 384


class LeaseLost(Exception):
    """409 on a lease-scoped call: the job is no longer ours; stop working on it."""


class Canceled(Exception):
    """A heartbeat said the job's cancel was requested."""


def call(method, path, body=None, *, key=WORKER_KEY, lease=None, data=None,
         content_type="application/json", headers=None, timeout=120):
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + key)
    if data is not None:
        req.add_header("Content-Type", content_type)
    if lease:
        req.add_header("Capibara-Lease", lease)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        problem = e.read().decode(errors="replace")
        if e.code == 409 and lease:
            raise LeaseLost(problem) from None
        raise RuntimeError(f"{method} {path}: {e.code} {problem}") from None
    if r.headers.get_content_type() == "application/json" and raw:
        return json.loads(raw)
    return raw


def safetensors(tensors, metadata):
    """A safetensors file: an 8-byte little-endian header length, the JSON header, the data."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, (shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def model_file(w, b, labels, max_length):
    """The model in Capibara's classifier format: the head and what it is (docs/models.md)."""
    info = {"format": MODEL_FORMAT, "base": "all-minilm-l6-v2", "labels": labels,
            "max_length": max_length, "train_layers": 0}
    flat = [x for row in w for x in row]
    return safetensors({"head.weight": ([len(labels), DIMENSIONS], flat),
                        "head.bias": ([len(labels)], b)},
                       {"capibara": json.dumps(info)})


def examples_of(spec):
    if spec.get("examples") is not None:
        return spec["examples"]
    if spec.get("examples_url"):
        with urllib.request.urlopen(spec["examples_url"], timeout=120) as r:
            text = r.read().decode()
    else:
        a = spec["examples_artifact"]
        text = call("GET", f"/v1/jobs/{a['job_id']}/artifacts/{a['name']}",
                    key=SUBMIT_KEY).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def embed(texts):
    """Sentence vectors from Capibara's `text.embed` jobs (256 texts a job)."""
    vectors = []
    for i in range(0, len(texts), 256):
        job = call("POST", "/v1/jobs", {"kind": "text.embed",
                                        "input": {"texts": texts[i:i + 256]}},
                   key=SUBMIT_KEY, headers={"Prefer": "wait=60"})
        while job["status"] not in ("succeeded", "failed", "canceled"):
            job = call("GET", f"/v1/jobs/{job['id']}", key=SUBMIT_KEY,
                       headers={"Prefer": "wait=30"})
        if job["status"] != "succeeded":
            raise RuntimeError(f"text.embed: {job.get('error')}")
        vectors += job["output"]["vectors"]
    return vectors


def split(examples, share, seed):
    """Hold out `share` of each label's examples, chosen by the seed."""
    rng, by_label, held = random.Random(seed), {}, set()
    for i, e in enumerate(examples):
        by_label.setdefault(e["label"], []).append(i)
    for rows in by_label.values():
        rng.shuffle(rows)
        held.update(rows[:int(len(rows) * share)])
    return held


def probabilities(w, b, x):
    z = [sum(wi * xi for wi, xi in zip(row, x)) + bi for row, bi in zip(w, b)]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    s = sum(e)
    return [v / s for v in e]


def evaluate(w, b, rows):
    loss = correct = 0.0
    for x, y in rows:
        p = probabilities(w, b, x)
        loss -= math.log(max(p[y], 1e-12))
        correct += p.index(max(p)) == y
    return loss / max(len(rows), 1), correct / max(len(rows), 1)


class Heartbeat(threading.Thread):
    """Renews the lease every `every` seconds; notes a requested cancel or a lost lease."""

    def __init__(self, job_id, token, every):
        super().__init__(daemon=True)
        self.job_id, self.token, self.every = job_id, token, every
        self.cancel = self.lost = False
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(self.every):
            try:
                beat = call("POST", f"/v1/jobs/{self.job_id}/heartbeat", {}, lease=self.token)
                self.cancel = beat["cancel_requested"]
            except LeaseLost:
                self.lost = True
                return
            except Exception as e:  # a network blip: the next beat tries again
                print(f"heartbeat: {e}", file=sys.stderr)

    def check(self):
        if self.lost:
            raise LeaseLost("the lease expired")
        if self.cancel:
            raise Canceled()


def train(job, token, heartbeat):
    spec, job_id = job["input"], job["id"]
    params = spec.get("params") or {}

    def report(percent, message, data):
        call("POST", f"/v1/jobs/{job_id}/progress",
             {"percent": percent, "message": message, "data": data}, lease=token)

    def upload(name, payload):
        return call("PUT", f"/v1/jobs/{job_id}/artifacts/{name}", data=payload,
                    content_type="application/vnd.safetensors", lease=token)

    examples = examples_of(spec)
    labels = sorted({e["label"] for e in examples})
    held = split(examples, spec.get("validation_split", 0.2), spec.get("seed", 0))
    report(0, f"embedding {len(examples)} examples", {"phase": "embed"})
    vectors = embed([e["text"] for e in examples])
    heartbeat.check()
    rows = [(v, labels.index(e["label"])) for v, e in zip(vectors, examples)]
    train_rows = [r for i, r in enumerate(rows) if i not in held]
    val_rows = [r for i, r in enumerate(rows) if i in held]

    epochs = spec.get("epochs", 20)
    batch = spec.get("batch_size", 16)
    lr = params.get("sgd_learning_rate", 2.0)
    every = spec.get("checkpoint_every", 100)
    rng = random.Random(spec.get("seed", 0))
    w = [[0.0] * DIMENSIONS for _ in labels]
    b = [0.0] * len(labels)
    steps_per_epoch = math.ceil(len(train_rows) / batch)
    step, started = 0, time.monotonic()
    for epoch in range(1, epochs + 1):
        rng.shuffle(train_rows)
        for i in range(0, len(train_rows), batch):
            heartbeat.check()
            chunk = train_rows[i:i + batch]
            gw = [[0.0] * DIMENSIONS for _ in labels]
            gb = [0.0] * len(labels)
            for x, y in chunk:
                p = probabilities(w, b, x)
                for k in range(len(labels)):
                    g = (p[k] - (k == y)) / len(chunk)
                    gb[k] += g
                    row = gw[k]
                    for d in range(DIMENSIONS):
                        row[d] += g * x[d]
            for k in range(len(labels)):
                b[k] -= lr * gb[k]
                w[k] = [wi - lr * gi for wi, gi in zip(w[k], gw[k])]
            step += 1
            if step % every == 0:
                name = f"checkpoint-{step:08}.safetensors"
                upload(name, model_file(w, b, labels, 256))
                report(100 * step / (epochs * steps_per_epoch), f"checkpoint at step {step}",
                       {"checkpoint_step": step, "artifacts": [{"name": name}]})
        loss, accuracy = evaluate(w, b, train_rows)
        data = {"epoch": epoch, "step": step, "loss": loss, "accuracy": accuracy,
                "examples_per_s": step * batch / (time.monotonic() - started)}
        if val_rows:
            data["validation_loss"], data["validation_accuracy"] = evaluate(w, b, val_rows)
        report(100 * epoch / epochs, f"epoch {epoch}/{epochs}: loss {loss:.4f}", data)

    upload("model.safetensors", model_file(w, b, labels, 256))
    metrics = {"train_examples": len(train_rows), "validation_examples": len(val_rows),
               "epochs": epochs, "steps": step, "train_loss": data["loss"],
               "train_accuracy": data["accuracy"],
               "validation_accuracy": data.get("validation_accuracy"),
               "duration_s": time.monotonic() - started}
    call("POST", f"/v1/jobs/{job_id}/complete",
         {"output": {"artifact": "model.safetensors", "metrics": metrics},
          "artifacts": [{"name": "model.safetensors", "content_type": "application/vnd.safetensors"}]},
         lease=token)
    print(f"trained job {job_id}: {metrics}", flush=True)


def main():
    once = "--once" in sys.argv
    worker = call("POST", "/v1/workers", {"name": "py-trainer", "kinds": ["finetune.command"],
                                          "concurrency": 1, "version": "example-1"})
    print(f"registered {worker['name']} on queues {worker['queues']}", flush=True)
    while True:
        leased = call("POST", f"/v1/workers/{worker['id']}/lease",
                      {"max_jobs": 1, "wait_ms": 30000})["jobs"]
        for item in leased:
            job, token = item["job"], item["lease"]["token"]
            heartbeat = Heartbeat(job["id"], token, worker["heartbeat_s"])
            heartbeat.start()
            try:
                train(job, token, heartbeat)
            except Canceled:
                call("POST", f"/v1/jobs/{job['id']}/fail",
                     {"error": {"type": "canceled", "message": "stopped on request"},
                      "retryable": False}, lease=token)
            except LeaseLost as e:
                print(f"job {job['id']}: lease lost ({e}); it runs again elsewhere",
                      file=sys.stderr)
            except Exception as e:
                call("POST", f"/v1/jobs/{job['id']}/fail",
                     {"error": {"type": type(e).__name__, "message": str(e)[:1000]},
                      "retryable": True}, lease=token)
                raise
            finally:
                heartbeat.done.set()
            if once:
                return


if __name__ == "__main__":
    main()
