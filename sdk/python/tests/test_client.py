"""The client against a real server: submit and wait, batches, idempotency, typed errors,
kinds, workflows, schedules, and the asyncio client."""

from __future__ import annotations

import asyncio
import uuid

from _support import ServerTestCase, capibara, requires_server


@requires_server
class SubmitAndWaitTest(ServerTestCase):
    def test_submit_with_wait_returns_the_output(self) -> None:
        job = self.client.submit("echo", {"hello": "world"}, wait=20)
        self.assertEqual(job.status, "succeeded")
        self.assertEqual(job.output, {"hello": "world"})
        self.assertTrue(job.done)

    def test_wait_long_polls_until_the_job_ends(self) -> None:
        job = self.client.submit("sleep", {"ms": 1500})
        self.assertFalse(job.done)
        done = self.client.wait(job.id, timeout=20)
        self.assertEqual(done.status, "succeeded")
        self.assertEqual(self.client.get(job.id).status, "succeeded")

    def test_wait_timeout_raises_with_the_job(self) -> None:
        kind = self.kind()
        self.client.put_kind(kind)
        job = self.client.submit(kind)  # no worker runs this kind
        with self.assertRaises(capibara.WaitTimeout) as cm:
            self.client.wait(job.id, timeout=1)
        self.assertEqual(cm.exception.resource["id"], job.id)
        self.assertEqual(self.client.cancel(job.id).status, "canceled")
        with self.assertRaises(capibara.Conflict):
            self.client.cancel(job.id)  # finished: 409
        self.assertEqual(self.client.retry(job.id).status, "queued")
        self.client.cancel(job.id)

    def test_idempotency_key_and_batch(self) -> None:
        key = f"sdk-{uuid.uuid4()}"
        a = self.client.submit("echo", {"n": 1}, idempotency_key=key)
        b = self.client.submit("echo", {"n": 1}, idempotency_key=key)
        self.assertEqual(a.id, b.id)
        with self.assertRaises(capibara.ValidationError) as cm:
            self.client.submit("echo", {"n": 2}, idempotency_key=key)
        self.assertEqual(cm.exception.field, "Idempotency-Key")
        jobs = self.client.submit_batch([{"kind": "echo", "input": {"n": i}} for i in range(3)])
        self.assertEqual([self.client.wait(j.id, 20).output for j in jobs], [{"n": 0}, {"n": 1}, {"n": 2}])

    def test_typed_errors(self) -> None:
        with self.assertRaises(capibara.NotFound) as nf:
            self.client.get(str(uuid.uuid4()))
        self.assertEqual(nf.exception.status, 404)
        with self.assertRaises(capibara.ValidationError) as cm:
            self.client.submit("sleep", {"ms": "soon"})
        self.assertEqual(cm.exception.field, "input.ms")
        with self.assertRaises(capibara.ValidationError) as batch:
            self.client.submit_batch([{"kind": "echo"}, {"kind": "sleep", "input": {"ms": -1}}])
        self.assertTrue(batch.exception.field.startswith("jobs[1]"), batch.exception.field)
        with self.assertRaises(capibara.Unauthorized), capibara.Client(api_key="not-a-key") as bad:
            bad.get(str(uuid.uuid4()))


@requires_server
class KindsTest(ServerTestCase):
    def test_put_list_get_delete_and_schema_validation(self) -> None:
        kind = self.kind()
        schema = {"type": "object", "required": ["width"],
                  "properties": {"width": {"type": "integer", "minimum": 1}}}
        created = self.client.put_kind(kind, input_schema=schema, description="test kind")
        self.assertEqual(created.get("name"), kind)
        names = [k.get("name") for k in self.client.list_kinds()]
        self.assertIn(kind, names)
        self.assertIn("echo", names)
        self.assertEqual(self.client.get_kind(kind).get("description"), "test kind")
        with self.assertRaises(capibara.ValidationError) as cm:
            self.client.submit(kind, {"width": 0})
        self.assertEqual(cm.exception.field, "input.width")
        job = self.client.submit(kind, {"width": 3})
        self.client.cancel(job.id)
        self.client.delete_kind(kind)
        with self.assertRaises(capibara.ValidationError):
            self.client.submit(kind, {"width": 3})
        with self.assertRaises(capibara.ValidationError) as builtin:
            self.client.put_kind("code.mine")
        self.assertEqual(builtin.exception.field, "name")


@requires_server
class WorkflowsAndSchedulesTest(ServerTestCase):
    def test_workflow_run_with_wait(self) -> None:
        wf = self.client.create_workflow({
            "name": f"sdk-{uuid.uuid4().hex[:8]}",
            "steps": [
                {"id": "a", "kind": "echo", "input": {"n": "{{ input.n }}"}},
                {"id": "b", "kind": "echo", "depends_on": ["a"], "input": {"twice": "{{ steps.a.output.n * 2 }}"}},
            ],
            "output": "{{ steps.b.output }}",
        })
        run = self.client.start_run(wf["id"], {"n": 21}, wait=30)
        self.assertEqual(run.status, "succeeded")
        self.assertEqual(run.output, {"twice": 42})
        self.assertEqual(self.client.get_run(run.id).status, "succeeded")
        self.assertIn("RunSucceeded", [e.type for e in self.client.run_events(run.id)])
        self.client.delete_workflow(wf["id"])

    def test_schedule_create_list_delete(self) -> None:
        name = f"sdk-{uuid.uuid4().hex[:8]}"
        s = self.client.create_schedule(name, "@daily", job={"kind": "echo", "input": {"x": 1}})
        self.assertEqual(s["name"], name)
        self.assertTrue(s.get("next_fire_times"))
        self.assertIn(s["id"], [x["id"] for x in self.client.list_schedules()])
        self.client.delete_schedule(s["id"])
        self.assertNotIn(s["id"], [x["id"] for x in self.client.list_schedules()])
        with self.assertRaises(capibara.ValidationError) as cm:
            self.client.create_schedule(name, "not cron", job={"kind": "echo"})
        self.assertEqual(cm.exception.field, "cron")


@requires_server
class AsyncClientTest(ServerTestCase):
    def test_async_submit_wait_and_stream(self) -> None:
        async def main() -> None:
            async with capibara.AsyncClient() as ac:
                jobs = await asyncio.gather(*(ac.submit("echo", {"i": i}) for i in range(5)))
                done = await asyncio.gather(*(ac.wait(j.id, 20) for j in jobs))
                self.assertEqual([d.output for d in done], [{"i": i} for i in range(5)])
                types = [e.type async for e in ac.stream(jobs[0].id)]
                self.assertEqual(types[0], "JobSubmitted")
                self.assertEqual(types[-1], "JobSucceeded")
                with self.assertRaises(capibara.NotFound):
                    await ac.get(str(uuid.uuid4()))

        asyncio.run(main())
