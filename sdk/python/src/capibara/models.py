"""What the API returns: plain dicts (the JSON as sent) that also read as attributes."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["Model", "Job", "Run", "Event", "Lease", "TERMINAL_JOB", "TERMINAL_RUN"]

TERMINAL_JOB = frozenset({"succeeded", "failed", "canceled"})
TERMINAL_RUN = frozenset({"succeeded", "failed", "canceled"})


class Model(Dict[str, Any]):
    """A JSON object; `m.field` is `m["field"]` (None for a documented field that is absent)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            for klass in type(self).__mro__:
                if name in getattr(klass, "__annotations__", {}):
                    return None
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


class Job(Model):
    """A job (`GET /v1/jobs/{id}`)."""

    id: str
    kind: str
    queue: str
    status: str
    input: Any
    output: Any
    error: Optional[Dict[str, Any]]
    progress: Optional[Dict[str, Any]]
    attempt: int
    max_attempts: int
    timeout_s: Optional[int]
    cancel_requested: bool
    tags: Dict[str, str]

    @property
    def done(self) -> bool:
        """Whether the job finished (succeeded, failed or canceled)."""
        return self.get("status") in TERMINAL_JOB


class Run(Model):
    """A workflow run (`GET /v1/runs/{id}`)."""

    id: str
    workflow_id: str
    status: str
    input: Any
    output: Any
    error: Optional[Dict[str, Any]]
    steps: List[Dict[str, Any]]

    @property
    def done(self) -> bool:
        return self.get("status") in TERMINAL_RUN


class Event(Model):
    """An event envelope: `id` (the resume cursor), `type`, `data`, `version`, `metadata`, …"""

    id: str
    type: str
    data: Any
    version: int
    stream_type: str
    stream_id: str
    metadata: Dict[str, Any]
    recorded_at: str


class Lease(Model):
    """A leased job: `job` (the job) and `token` / `expires_at` of its lease."""

    job: Job
    token: str
    expires_at: str

    @classmethod
    def from_item(cls, item: Dict[str, Any]) -> "Lease":
        lease = item.get("lease") or {}
        return cls(job=Job(item.get("job") or {}), token=lease.get("token"), expires_at=lease.get("expires_at"))
