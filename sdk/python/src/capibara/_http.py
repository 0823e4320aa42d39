"""The HTTP transport: one keep-alive connection per thread, JSON in and out, typed errors, and
retries with backoff for calls that are safe to repeat."""

from __future__ import annotations

import http.client
import json as _json
import random
import select
import socket
import threading
import time
import urllib.parse
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import TransportError, problem_from_response, retry_after_seconds

__all__ = ["Response", "Transport"]

USER_AGENT = "capibara-python/0.1.0"
_NO_BODY = object()


class Response:
    """A successful answer: status, lower-cased headers and the parsed body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Dict[str, str], body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Response({self.status})"


def _headers(msg: http.client.HTTPMessage) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for k, v in msg.items():
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def _parse(data: bytes, headers: Mapping[str, str]) -> Any:
    if not data:
        return None
    text = data.decode("utf-8", errors="replace")
    if "json" in headers.get("content-type", "") or text[:1] in ("{", "["):
        try:
            return _json.loads(text)
        except ValueError:
            return text
    return text


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether a pooled connection was closed by the server while idle."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)  # an idle connection has nothing to read unless it was closed


class Transport:
    """Sends requests to one Capibara API. Thread-safe: each thread keeps its own connection."""

    def __init__(
        self,
        url: str,
        api_key: Optional[str],
        timeout: float = 30.0,
        max_retries: int = 3,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.base_path = parts.path.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_idle = 16
        self._idle: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    # Connections: a pool of idle keep-alive connections shared by all threads.

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _acquire(self, timeout: float) -> Tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _dropped(conn):
                    conn.close()
                    continue
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                return conn, True
        return self._new_connection(timeout), False

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections (the transport stays usable)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # Requests.

    def path(self, path: str, query: Optional[Iterable[Tuple[str, Any]]] = None) -> str:
        full = self.base_path + path
        if query:
            pairs = [(k, _query_value(v)) for k, v in query if v is not None]
            if pairs:
                full += "?" + urllib.parse.urlencode(pairs)
        return full

    def headers(self, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        h = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            h.update(extra)
        return h

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = _NO_BODY,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        query: Optional[Iterable[Tuple[str, Any]]] = None,
        timeout: Optional[float] = None,
        idempotent: Optional[bool] = None,
        lease_scoped: bool = False,
    ) -> Response:
        """Send one request and return its answer, or raise a typed error.

        Transport errors and 503s are retried with exponential backoff only when the call is
        `idempotent` (default: GET, PUT, DELETE, and any request with an `Idempotency-Key`);
        429s are retried for every call, since the server refused them before doing anything.
        """
        h = self.headers(headers)
        if json is not _NO_BODY:
            body = _json.dumps(json, separators=(",", ":")).encode()
            h.setdefault("Content-Type", "application/json")
        elif body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE") or any(
                k.lower() == "idempotency-key" for k in h
            )
        t = self.timeout if timeout is None else timeout
        target = self.path(path, query)
        attempt = 0
        while True:
            try:
                status, rh, data = self._send(method, target, body, h, t)
            except TransportError:
                if idempotent and attempt < self.max_retries:
                    time.sleep(_backoff(attempt))
                    attempt += 1
                    continue
                raise
            if status < 400:
                return Response(status, rh, _parse(data, rh))
            retryable = status == 429 or (status in (502, 503, 504) and idempotent)
            if retryable and attempt < self.max_retries:
                wait = retry_after_seconds(rh)
                time.sleep(min(wait, 10.0) if wait is not None else _backoff(attempt))
                attempt += 1
                continue
            raise problem_from_response(status, _parse(data, rh), rh, lease_scoped=lease_scoped)

    def _send(
        self, method: str, target: str, body: Optional[bytes], headers: Dict[str, str], timeout: float
    ) -> Tuple[int, Dict[str, str], bytes]:
        for fresh_try in (False, True):
            conn, reused = self._acquire(timeout)
            try:
                conn.request(method, target, body=body, headers=headers)
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                # A reused connection the server had just closed: the request never arrived.
                if reused and not fresh_try:
                    continue
                raise TransportError(f"{method} {target}: {e!r}") from e
            try:
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise TransportError(f"{method} {target}: {e!r}") from e
            rh = _headers(resp.msg)
            if resp.will_close:
                conn.close()
            else:
                self._give_back(conn)
            return resp.status, rh, data
        raise AssertionError("unreachable")

    def open_stream(
        self,
        path: str,
        headers: Optional[Mapping[str, str]] = None,
        query: Optional[Iterable[Tuple[str, Any]]] = None,
        timeout: float = 60.0,
    ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Open a streaming GET on its own connection (for SSE). The caller closes it."""
        h = self.headers(headers)
        target = self.path(path, query)
        conn = self._new_connection(timeout)
        try:
            conn.request("GET", target, headers=h)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise TransportError(f"GET {target}: {e!r}") from e
        if resp.status >= 400:
            rh = _headers(resp.msg)
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException):
                data = b""
            conn.close()
            raise problem_from_response(resp.status, _parse(data, rh), rh)
        return conn, resp


def _query_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _backoff(attempt: int) -> float:
    """0.2 s, 0.4 s, 0.8 s, … (at most 5 s), with ±20 % jitter."""
    return float(min(5.0, 0.2 * 2.0**attempt) * random.uniform(0.8, 1.2))


def shutdown_socket(conn: Optional[http.client.HTTPConnection]) -> None:
    """Abort a blocking read on `conn` from another thread."""
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
