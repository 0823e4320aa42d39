"""Guest side of Capibara's Python sandbox (a componentize-py component).

componentize-py snapshots the interpreter after this module is imported, so every import
below is already done when a job starts (~2 ms a run). It only bundles the standard library
modules imported here: this list IS the whitelist documented in docs/code.md. Anything else
(os.system, subprocess, socket, ...) is either absent or refused by WASI.
"""

# --- the stdlib whitelist (keep in sync with docs/code.md) -------------------------------
import base64
import bisect
import builtins
import calendar
import collections
import collections.abc
import copy
import csv
import dataclasses
import datetime
import decimal
import difflib
import enum
import fractions
import functools
import hashlib
import heapq
import html
import io
import itertools
import json
import keyword  # for binding context keys; dataclasses imports it anyway
import math
import operator
import random
import re
import statistics
import string
import sys
import textwrap
import time
import traceback
import typing
import unicodedata
import urllib.parse
import uuid
import zoneinfo  # noqa: F401  (time zones need tzdata, absent: UTC only)

import wit_world

_WHITELIST = (
    base64, bisect, calendar, collections, copy, csv, dataclasses, datetime, decimal, difflib,
    enum, fractions, functools, hashlib, heapq, html, io, itertools, json, math, operator,
    random, re, statistics, string, textwrap, time, typing, unicodedata, urllib, uuid,
)


_real_sleep = time.sleep


def _sleep(seconds):
    """time.sleep in short steps: a sleep inside the host cannot be interrupted, so the
    wall-clock timeout is checked between the steps."""
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        _real_sleep(min(left, 0.01))


time.sleep = _sleep


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # a full output pipe: the host sees the cap and reports it
            pass


def _user_traceback(exc):
    """The traceback without this wrapper's own frame."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _scope(context):
    """The globals a run starts with: `context`, and each top-level key of a `context` object
    as a variable of its own (`{"x": 5}` -> `x`), when the key is a Python identifier, not a
    keyword, not a dunder and not `context` or `result` (docs/code.md). Every key stays
    reachable as `context[key]`."""
    scope = {}
    if isinstance(context, dict):
        for key, value in context.items():
            if (key.isidentifier() and not keyword.iskeyword(key) and not key.startswith("__")
                    and key not in ("context", "result")):
                scope[key] = value
    scope.update(__name__="__main__", __builtins__=builtins, context=context)
    return scope


class WitWorld(wit_world.WitWorld):
    def exec(self, code: str, context_json: str) -> str:
        report = {"status": "ok", "exit_code": 0}
        try:
            scope = _scope(json.loads(context_json))
            try:
                compiled = compile(code, "<code>", "exec")
            except SyntaxError as exc:
                report = {
                    "status": "error",
                    "error_type": "runtime_error",
                    "message": f"{type(exc).__name__}: {exc.msg}",
                    "line": exc.lineno,
                    "column": exc.offset,
                    "traceback": "".join(traceback.format_exception_only(type(exc), exc)),
                    "exit_code": 1,
                }
                return json.dumps(report)
            exec(compiled, scope)
            if "result" in scope:
                report["result"] = scope["result"]
        except SystemExit as exc:
            code_ = exc.code
            if code_ is None:
                code_ = 0
            elif not isinstance(code_, int):
                print(code_, file=sys.stderr)
                code_ = 1
            report = {"status": "exit", "exit_code": code_}
            if code_ != 0:
                report.update(status="error", error_type="runtime_error",
                              message=f"SystemExit: {code_}")
        except MemoryError as exc:
            report = {"status": "error", "error_type": "memory_limit",
                      "message": "MemoryError", "traceback": _user_traceback(exc),
                      "exit_code": 1}
        except BaseException as exc:  # noqa: BLE001  (everything the user code raises)
            report = {"status": "error", "error_type": "runtime_error",
                      "message": f"{type(exc).__name__}: {exc}",
                      "traceback": _user_traceback(exc), "exit_code": 1}
        finally:
            _flush()
        try:
            return json.dumps(report, default=_fallback)
        except BaseException as exc:  # noqa: BLE001  (e.g. a circular result)
            return json.dumps({"status": "error", "error_type": "runtime_error",
                               "message": f"result is not JSON-serializable: {exc}",
                               "exit_code": 1})

    def check(self, code: str) -> str:
        try:
            compile(code, "<code>", "exec")
        except SyntaxError as exc:
            return json.dumps({"valid": False, "message": f"{type(exc).__name__}: {exc.msg}",
                               "line": exc.lineno, "column": exc.offset})
        except BaseException as exc:  # noqa: BLE001  (e.g. null bytes: ValueError)
            return json.dumps({"valid": False, "message": f"{type(exc).__name__}: {exc}"})
        return json.dumps({"valid": True})


def _fallback(value):
    """JSON for common non-JSON results: sets/tuples as lists, the rest as str()."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, fractions.Fraction, uuid.UUID)):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
