"""Server-sent events: a parser (per the WHATWG spec) and a resumable reader of event streams."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

from ._http import Transport, shutdown_socket
from .errors import ProblemError, TransportError
from .models import Event

__all__ = ["SseMessage", "SseParser", "follow"]


class SseMessage:
    """One dispatched SSE message: `id` (the last id seen, as the spec says), `event`, `data`."""

    __slots__ = ("id", "event", "data", "retry")

    def __init__(self, id: Optional[str], event: str, data: str, retry: Optional[int]) -> None:
        self.id = id
        self.event = event
        self.data = data
        self.retry = retry

    def __repr__(self) -> str:
        return f"SseMessage(id={self.id!r}, event={self.event!r}, data={self.data[:60]!r})"


class SseParser:
    """Feed lines (bytes or str, with or without their line ending); get messages back."""

    def __init__(self) -> None:
        self.last_event_id: Optional[str] = None
        self.retry: Optional[int] = None
        self._event = ""
        self._data: List[str] = []
        self._has_data = False
        self._first = True

    def feed_line(self, line: Any) -> Optional[SseMessage]:
        """One line; returns the message a blank line completes, else None."""
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        if self._first:
            self._first = False
            if line.startswith("\ufeff"):
                line = line[1:]
        line = line.rstrip("\r\n")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry = int(value)
        return None

    def feed(self, text: str) -> List[SseMessage]:
        """A chunk of whole lines (\\n, \\r\\n or \\r endings)."""
        out = []
        for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            msg = self.feed_line(line)
            if msg is not None:
                out.append(msg)
        return out

    def _dispatch(self) -> Optional[SseMessage]:
        if not self._has_data:
            self._event = ""
            return None
        msg = SseMessage(self.last_event_id, self._event or "message", "\n".join(self._data), self.retry)
        self._event = ""
        self._data = []
        self._has_data = False
        return msg


def messages(lines: Iterable[Any]) -> Iterator[SseMessage]:
    """Parse an iterable of lines into messages."""
    parser = SseParser()
    for line in lines:
        msg = parser.feed_line(line)
        if msg is not None:
            yield msg


def to_event(msg: SseMessage) -> Event:
    """A Capibara event from an SSE message whose data is an event envelope."""
    try:
        envelope = json.loads(msg.data)
    except ValueError:
        envelope = {"data": msg.data}
    if not isinstance(envelope, dict):
        envelope = {"data": envelope}
    envelope.setdefault("id", msg.id)
    envelope.setdefault("type", msg.event)
    return Event(envelope)


def _lines(resp: http.client.HTTPResponse) -> Iterator[bytes]:
    while True:
        line = resp.readline(1 << 20)
        if not line:
            return
        yield line


def follow(
    transport: Transport,
    path: str,
    last_event_id: Optional[str] = None,
    query: Optional[List[Tuple[str, Any]]] = None,
    is_terminal: Optional[Callable[[Event], bool]] = None,
    read_timeout: float = 60.0,
    max_reconnects: int = 10,
) -> Iterator[Event]:
    """Follow an SSE event stream, reconnecting with `Last-Event-ID` when the connection breaks
    (no gap, no duplicate). Ends when the server closes the stream cleanly (after a job's or
    run's terminal event) or after an event `is_terminal` accepts."""
    last = last_event_id
    failures = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last is not None:
            headers["Last-Event-ID"] = str(last)
        try:
            conn, resp = transport.open_stream(path, headers, query, timeout=read_timeout)
        except TransportError:
            failures += 1
            if failures > max_reconnects:
                raise
            time.sleep(min(5.0, 0.2 * 2**failures))
            continue
        except ProblemError as e:
            if e.status in (429, 502, 503, 504) and failures < max_reconnects:
                failures += 1
                time.sleep(min(10.0, (getattr(e, "retry_after", None) or 0.2 * 2**failures)))
                continue
            raise
        try:
            for msg in messages(_lines(resp)):
                event = to_event(msg)
                if msg.id is not None:
                    last = msg.id
                failures = 0
                yield event
                if is_terminal is not None and is_terminal(event):
                    return
            return  # closed cleanly by the server
        except (OSError, http.client.HTTPException) as e:
            failures += 1
            if failures > max_reconnects:
                raise TransportError(f"event stream {path}: {e!r}") from e
            time.sleep(min(5.0, 0.1 * 2**failures))
        finally:
            shutdown_socket(conn)
            conn.close()
