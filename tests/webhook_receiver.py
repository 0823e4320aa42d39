#!/usr/bin/env python3
"""An independent Standard Webhooks receiver for end-to-end tests.

Written from the spec (https://www.standardwebhooks.com), sharing no code with Capibara, so a
signing bug on our side cannot be mirrored by the checker.

    python3 tests/webhook_receiver.py --port P --secret whsec_... --log FILE
        [--secret whsec_...]... [--fail-first N] [--status-after CODE] [--always STATUS]
        [--tolerance 300]

For each POST:
  - verify: key = base64-decode(secret after "whsec_"); expected = base64(HMAC-SHA256(key,
    "{webhook-id}.{webhook-timestamp}.{raw body}")); the request passes when any
    space-separated "v1,<sig>" entry of webhook-signature equals it (hmac.compare_digest) for
    any --secret, and the timestamp is within --tolerance seconds of now;
  - respond 401 when verification fails; otherwise 500 for the first N verified requests
    (--fail-first N), then --status-after CODE if given, else --always STATUS if given, else
    200 {"ok":true};
  - append one JSON line to the log: {"path", "verified", "reason", "webhook_id", "timestamp",
    "headers" (lowercased names), "status_returned", "body"} ("body" is the parsed JSON, or null
    with "raw_body" when the body is not JSON), flushed at once.

--port 0 picks a free port. Prints "ready <port>" on stdout once listening.
"""

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "whsec_"


def decode_secret(s):
    if not s.startswith(PREFIX):
        raise ValueError("secret must start with whsec_: %r" % s[:8])
    try:
        key = base64.b64decode(s[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("secret is not valid base64: %s" % e)
    if not key:
        raise ValueError("secret key is empty")
    return key


def expected_signature(key, msg_id, timestamp, body):
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify(keys, tolerance, msg_id, timestamp, signature_header, body):
    """Returns (ok, reason)."""
    if not msg_id or not timestamp or not signature_header:
        return False, "missing webhook-id, webhook-timestamp or webhook-signature"
    try:
        ts = int(timestamp)
    except ValueError:
        return False, "webhook-timestamp is not an integer"
    now = int(time.time())
    if ts < now - tolerance:
        return False, "timestamp too old"
    if ts > now + tolerance:
        return False, "timestamp too new"
    candidates = []
    for entry in signature_header.split(" "):
        version, sep, sig = entry.partition(",")
        if sep and version == "v1":
            candidates.append(sig)
    if not candidates:
        return False, "no v1 signature"
    ok = False
    for key in keys:
        want = expected_signature(key, msg_id, timestamp, body)
        for sig in candidates:
            if hmac.compare_digest(want.encode(), sig.encode()):
                ok = True
    return (True, None) if ok else (False, "no signature matches")


class State:
    def __init__(self, args):
        self.keys = [decode_secret(s) for s in args.secret]
        self.tolerance = args.tolerance
        self.fail_first = args.fail_first
        self.status_after = args.status_after
        self.always = args.always
        self.reply_input = args.reply_input
        self.retry_after = args.retry_after
        self.verified_count = 0
        self.lock = threading.Lock()
        self.log = open(args.log, "a", encoding="utf-8")

    def next_status(self):
        """Status for the next verified request (call with the lock held)."""
        self.verified_count += 1
        if self.verified_count <= self.fail_first:
            return 500
        if self.status_after is not None:
            return self.status_after
        if self.always is not None:
            return self.always
        return 200

    def write(self, record):
        self.log.write(json.dumps(record, sort_keys=True) + "\n")
        self.log.flush()


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):  # keep stderr quiet
            pass

        def _reply(self, status, payload, headers=()):
            data = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            msg_id = self.headers.get("webhook-id")
            timestamp = self.headers.get("webhook-timestamp")
            sig = self.headers.get("webhook-signature")
            ok, reason = verify(state.keys, state.tolerance, msg_id, timestamp, sig, body)
            try:
                parsed = json.loads(body.decode("utf-8")) if body else None
                raw = None
            except (UnicodeDecodeError, ValueError):
                parsed = None
                raw = body.decode("utf-8", "replace")
            with state.lock:
                status = state.next_status() if ok else 401
                record = {
                    "path": self.path,
                    "verified": ok,
                    "reason": reason,
                    "webhook_id": msg_id,
                    "timestamp": timestamp,
                    "status_returned": status,
                    "body": parsed,
                    # Every request header, names lowercased (custom subscription headers).
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
                if raw is not None:
                    record["raw_body"] = raw
                state.write(record)
            if status == 200 and state.reply_input:
                # A push endpoint's answer: the job's input and attempt.
                job = (parsed or {}).get("job") or {}
                self._reply(200, {"input": job.get("input"), "attempt": job.get("attempt")})
            elif status == 429 and state.retry_after is not None:
                self._reply(429, {"ok": False}, [("retry-after", str(state.retry_after))])
            elif status == 200:
                self._reply(200, {"ok": True})
            elif status == 401:
                self._reply(401, {"ok": False, "error": reason})
            else:
                self._reply(status, {"ok": False})

        def do_GET(self):
            self._reply(200, {"ok": True, "receiver": True})

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--secret", action="append", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--status-after", type=int)
    p.add_argument("--always", type=int)
    p.add_argument("--tolerance", type=int, default=300)
    p.add_argument("--reply-input", action="store_true",
                   help="answer 200 with {input, attempt} of the pushed job")
    p.add_argument("--retry-after", type=int, help="Retry-After (seconds) on 429 answers")
    args = p.parse_args()
    try:
        state = State(args)
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        sys.exit(2)
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    print("ready %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
