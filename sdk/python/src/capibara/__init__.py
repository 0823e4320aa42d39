"""Capibara's Python SDK: a client for the job API and a worker for your own kinds.

    from capibara import Client, Worker
"""

from __future__ import annotations

import logging

from .async_client import AsyncClient
from .client import Client
from .errors import (
    BadRequest,
    CapibaraError,
    Cancelled,
    Conflict,
    Fatal,
    Forbidden,
    LeaseLost,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    RateLimited,
    RetryAfter,
    ServerError,
    TransportError,
    Unauthorized,
    Unavailable,
    ValidationError,
    WaitTimeout,
)
from .job import JobContext
from .models import Event, Job, Lease, Model, Run
from .worker import Worker

__version__ = "0.1.0"

# Silent unless the application configures logging (`logging.basicConfig(level=logging.INFO)`).
logging.getLogger("capibara").addHandler(logging.NullHandler())

__all__ = [
    "AsyncClient",
    "BadRequest",
    "CapibaraError",
    "Cancelled",
    "Client",
    "Conflict",
    "Event",
    "Fatal",
    "Forbidden",
    "Job",
    "JobContext",
    "Lease",
    "LeaseLost",
    "Model",
    "NotFound",
    "PayloadTooLarge",
    "ProblemError",
    "RateLimited",
    "RetryAfter",
    "Run",
    "ServerError",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "WaitTimeout",
    "Worker",
]
