"""The worker protocol by hand: a stale lease is refused with `LeaseLost` and records nothing."""

from __future__ import annotations

import time
import uuid

from _support import FAST_BACKOFF, ServerTestCase, capibara, requires_server


@requires_server
class StaleLeaseTest(ServerTestCase):
    def test_an_expired_lease_is_refused_and_records_nothing(self) -> None:
        kind = self.kind()
        a = self.client.register_worker([kind], name="sdk-stale-a")
        self.addCleanup(self.client.deregister_worker, a["id"])
        self.assertEqual(a["kinds"], [kind])
        job = self.client.submit(kind, {"n": 1}, max_attempts=3, backoff=FAST_BACKOFF)
        (first,) = self.client.lease(a["id"], max_jobs=1, wait_ms=5000)
        self.assertEqual((first.job.id, first.job.attempt), (job.id, 1))
        self.client.report_progress(job.id, first.token, 10, "from A while it holds the lease")

        # No heartbeat: the lease expires, the job is retried and leased by another worker.
        b = self.client.register_worker([kind], name="sdk-stale-b")
        self.addCleanup(self.client.deregister_worker, b["id"])
        second = None
        deadline = time.monotonic() + 30
        while second is None and time.monotonic() < deadline:
            got = self.client.lease(b["id"], max_jobs=1, wait_ms=2000)
            second = got[0] if got else None
        self.assertIsNotNone(second, "the expired job was not leased again")
        assert second is not None
        self.assertEqual((second.job.id, second.job.attempt), (job.id, 2))

        before = [e.id for e in self.client.events(job.id)]
        with self.assertRaises(capibara.LeaseLost) as cm:
            self.client.complete(job.id, first.token, {"from": "A"})
        self.assertEqual(cm.exception.status, 409)
        self.assertTrue(cm.exception.type.endswith("lease-lost"), cm.exception.type)
        with self.assertRaises(capibara.LeaseLost):
            self.client.report_progress(job.id, first.token, 99, "stale")
        with self.assertRaises(capibara.LeaseLost):
            self.client.heartbeat(job.id, first.token)
        with self.assertRaises(capibara.LeaseLost):
            self.client.fail(job.id, first.token, "stale", "from A")
        self.assertEqual([e.id for e in self.client.events(job.id)], before)

        self.assertFalse(self.client.heartbeat(job.id, second.token)["cancel_requested"])
        done = self.client.complete(job.id, second.token, {"from": "B"})
        self.assertEqual((done.status, done.output), ("succeeded", {"from": "B"}))
        events = self.client.events(job.id)
        self.assertEqual([e.type for e in events].count("JobSucceeded"), 1)
        self.assertNotIn("stale", [e.data.get("message") for e in events if e.type == "JobProgress"])
        lost = [e.data for e in events if e.type == "JobAttemptFailed"]
        self.assertEqual(lost[0]["error"]["type"], "worker_lost")
        # The finished job refuses its last token too.
        with self.assertRaises(capibara.LeaseLost):
            self.client.complete(job.id, second.token, {"again": True})

    def test_a_malformed_token_or_another_jobs_token(self) -> None:
        kind = self.kind()
        w = self.client.register_worker([kind])
        self.addCleanup(self.client.deregister_worker, w["id"])
        one = self.client.submit(kind)
        other = self.client.submit(kind)
        leased = self.client.lease(w["id"], max_jobs=2, wait_ms=5000)
        self.assertEqual({l.job.id for l in leased}, {one.id, other.id})
        tokens = {l.job.id: l.token for l in leased}
        with self.assertRaises(capibara.ValidationError) as cm:
            self.client.heartbeat(one.id, "not-a-token")
        self.assertEqual(cm.exception.field, "Capibara-Lease")
        with self.assertRaises(capibara.LeaseLost):
            self.client.complete(one.id, tokens[other.id])
        self.assertEqual(self.client.release(one.id, tokens[one.id]).status, "queued")
        self.assertEqual(self.client.release(other.id, tokens[other.id]).status, "queued")
        with self.assertRaises(capibara.NotFound):
            self.client.lease(str(uuid.uuid4()), wait_ms=0)
        self.client.cancel(one.id)
        self.client.cancel(other.id)
