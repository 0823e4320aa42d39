"""Pure unit tests: the SSE parser, error mapping, models. No server needed."""

from __future__ import annotations

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import capibara  # noqa: E402
from capibara import errors  # noqa: E402
from capibara.client import _prefer  # noqa: E402
from capibara.sse import SseParser, messages, to_event  # noqa: E402


class SseParserTest(unittest.TestCase):
    def test_fields_multiline_data_comments_and_crlf(self) -> None:
        text = (
            "\ufeff: keep-alive\r\n"
            "id: 7\r\n"
            "event: JobProgress\r\n"
            "data: {\"a\":\r\n"
            "data: 1}\r\n"
            "\r\n"
            "data:no space\n"
            "\n"
        )
        msgs = SseParser().feed(text)
        self.assertEqual(len(msgs), 2)
        self.assertEqual((msgs[0].id, msgs[0].event, msgs[0].data), ("7", "JobProgress", '{"a":\n1}'))
        # The last id carries over (the spec's "last event ID"); the type resets to "message".
        self.assertEqual((msgs[1].id, msgs[1].event, msgs[1].data), ("7", "message", "no space"))

    def test_no_data_dispatches_nothing_and_retry_and_nul_id(self) -> None:
        p = SseParser()
        self.assertEqual(p.feed("event: x\nid: 3\n\n"), [])
        self.assertEqual(p.last_event_id, "3")
        self.assertEqual(p.feed("id: a\0b\nretry: 1500\nretry: soon\ndata: d\n\n")[0].id, "3")
        self.assertEqual(p.retry, 1500)

    def test_bytes_lines_and_bare_cr(self) -> None:
        msgs = list(messages([b"id: 1\n", b"data: x\n", b"\n", b"id: 2\n", b"data: y\n", b"\n"]))
        self.assertEqual([(m.id, m.data) for m in msgs], [("1", "x"), ("2", "y")])
        self.assertEqual([m.data for m in SseParser().feed("data: a\rdata: b\r\r")], ["a\nb"])

    def test_unterminated_message_is_not_dispatched(self) -> None:
        self.assertEqual(list(messages([b"id: 1\n", b"data: half"])), [])

    def test_to_event_reads_the_envelope(self) -> None:
        (msg,) = SseParser().feed('id: 12\nevent: JobSucceeded\ndata: {"id": "12", "type": "JobSucceeded", "data": {"output": 1}, "version": 4}\n\n')
        ev = to_event(msg)
        self.assertIsInstance(ev, capibara.Event)
        self.assertEqual((ev.id, ev.type, ev.data, ev.version), ("12", "JobSucceeded", {"output": 1}, 4))


class ErrorMappingTest(unittest.TestCase):
    def problem(self, status: int, **doc: object) -> errors.ProblemError:
        body = {"type": "urn:capibara:problem:x", "title": "T", "status": status, "detail": "d"}
        body.update(doc)
        return errors.problem_from_response(status, body, {"Retry-After": "7"})

    def test_status_classes(self) -> None:
        cases = {400: errors.BadRequest, 401: errors.Unauthorized, 403: errors.Forbidden,
                 404: errors.NotFound, 409: errors.Conflict, 413: errors.PayloadTooLarge,
                 422: errors.ValidationError, 429: errors.RateLimited, 503: errors.Unavailable,
                 500: errors.ServerError, 418: errors.ProblemError}
        for status, cls in cases.items():
            e = self.problem(status)
            self.assertIs(type(e), cls, status)
            self.assertIsInstance(e, errors.CapibaraError)
            self.assertEqual((e.status, e.type, e.title, e.detail), (status, "urn:capibara:problem:x", "T", "d"))

    def test_validation_names_the_field(self) -> None:
        e = self.problem(422, errors=[{"field": "input.width", "message": "must be an integer"}])
        self.assertIsInstance(e, capibara.ValidationError)
        self.assertEqual(e.field, "input.width")
        self.assertIn("422", str(e))

    def test_lease_lost(self) -> None:
        self.assertIsInstance(self.problem(409, type="urn:capibara:problem:lease-lost"), errors.LeaseLost)
        plain = errors.problem_from_response(409, {"type": "urn:capibara:problem:conflict"})
        self.assertIs(type(plain), errors.Conflict)
        scoped = errors.problem_from_response(409, {"type": "urn:capibara:problem:conflict"}, lease_scoped=True)
        self.assertIsInstance(scoped, errors.LeaseLost)
        self.assertIsInstance(scoped, errors.Conflict)

    def test_rate_limited_retry_after_and_non_json_bodies(self) -> None:
        self.assertEqual(self.problem(429).retry_after, 7.0)
        e = errors.problem_from_response(502, "<html>bad gateway</html>")
        self.assertIsInstance(e, errors.ServerError)
        self.assertIn("bad gateway", e.detail)
        self.assertIsNone(errors.problem_from_response(500, None).field)


class ModelsTest(unittest.TestCase):
    def test_job_attributes(self) -> None:
        job = capibara.Job({"id": "a", "status": "running", "output": None})
        self.assertEqual(job.id, "a")
        self.assertFalse(job.done)
        self.assertIsNone(job.error)  # a documented field that is absent
        with self.assertRaises(AttributeError):
            job.nonexistent_field
        self.assertTrue(capibara.Job(status="canceled").done)
        self.assertEqual(job["status"], "running")

    def test_prefer_header(self) -> None:
        self.assertEqual(_prefer(10), "wait=10")
        self.assertEqual(_prefer(2.5), "wait=2.5")
        self.assertEqual(_prefer(600), "wait=60")
        self.assertEqual(_prefer(-1), "wait=0")


if __name__ == "__main__":
    unittest.main()
