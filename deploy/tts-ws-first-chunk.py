"""Time to the first audio frame of GET /v1/tts/stream (the WebSocket), with the standard
library only: deploy/tts-first-request.sh runs it for the first and later requests of a worker.

usage: python3 deploy/tts-ws-first-chunk.py HOST:PORT KEY TEXT
prints: first_frame_ms <ms> job_id <id>
"""
import base64
import json
import os
import socket
import struct
import sys
import time


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    key, text = sys.argv[2], sys.argv[3]
    s = socket.create_connection((host, int(port)), timeout=120)
    nonce = base64.b64encode(os.urandom(16)).decode()
    s.sendall((
        f"GET /v1/tts/stream HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {key}\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, rest = buf.split(b"\r\n\r\n", 1)
    if b" 101 " not in head.split(b"\r\n")[0]:
        sys.exit(f"no upgrade: {head!r}")

    def recv(n):
        nonlocal rest
        while len(rest) < n:
            chunk = s.recv(65536)
            if not chunk:
                sys.exit("connection closed")
            rest += chunk
        out, rest = rest[:n], rest[n:]
        return out

    payload = json.dumps({"text": text, "streaming": True}).encode()
    mask = os.urandom(4)
    n = len(payload)
    header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    started = time.monotonic()
    s.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    while True:
        b0, b1 = recv(2)
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack(">H", recv(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", recv(8))[0]
        data = recv(length)
        if b0 & 0x0F == 8:
            sys.exit("closed before any audio")
        if b0 & 0x0F != 1:
            continue
        msg = json.loads(data)
        if msg.get("status") == "streaming":
            print("first_frame_ms", round((time.monotonic() - started) * 1000), "job_id", msg.get("job_id"))
            return
        if msg.get("status") in ("complete", "error"):
            sys.exit(f"no streaming frame: {msg}")


main()
