# Runs one code.run job inside the CPython WASI build (the fallback when the pre-initialized
# component is absent). The job arrives as JSON on stdin: {code, context, nonce, check}; the
# report goes to stdout after `nonce`, so the host can tell it from what the code printed.
import builtins, json, keyword, sys, time, traceback

_real_sleep = time.sleep

def _sleep(seconds):
    # In short steps, so the wall-clock timeout is checked between them.
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        _real_sleep(min(left, 0.01))

time.sleep = _sleep

def _scope(context):
    # The same globals as sandbox/python/app.py's _scope: `context`, and each top-level key
    # that is an identifier, not a keyword, not a dunder and not `context`/`result`.
    scope = {}
    if isinstance(context, dict):
        for key, value in context.items():
            if (key.isidentifier() and not keyword.iskeyword(key) and not key.startswith("__")
                    and key not in ("context", "result")):
                scope[key] = value
    scope.update(__name__="__main__", __builtins__=builtins, context=context)
    return scope

def _main():
    job = json.loads(sys.stdin.read())
    if job.get("check"):
        try:
            compile(job["code"], "<code>", "exec")
            report = {"valid": True}
        except SyntaxError as e:
            report = {"valid": False, "message": f"{type(e).__name__}: {e.msg}",
                      "line": e.lineno, "column": e.offset}
        except BaseException as e:
            report = {"valid": False, "message": f"{type(e).__name__}: {e}"}
    else:
        report = {"status": "ok", "exit_code": 0}
        scope = _scope(job["context"])
        try:
            try:
                code = compile(job["code"], "<code>", "exec")
            except SyntaxError as e:
                report = {"status": "error", "error_type": "runtime_error",
                          "message": f"{type(e).__name__}: {e.msg}", "line": e.lineno,
                          "column": e.offset, "exit_code": 1,
                          "traceback": "".join(traceback.format_exception_only(type(e), e))}
                code = None
            if code is not None:
                exec(code, scope)
                if "result" in scope:
                    report["result"] = scope["result"]
        except SystemExit as e:
            c = 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)
            report = {"status": "exit", "exit_code": c}
            if c != 0:
                report.update(status="error", error_type="runtime_error", message=f"SystemExit: {c}")
        except MemoryError as e:
            report = {"status": "error", "error_type": "memory_limit", "message": "MemoryError",
                      "exit_code": 1}
        except BaseException as e:
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
            report = {"status": "error", "error_type": "runtime_error",
                      "message": f"{type(e).__name__}: {e}", "exit_code": 1,
                      "traceback": "".join(traceback.format_exception(type(e), e, tb))}
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass
    try:
        text = json.dumps(report, default=str)
    except BaseException as e:
        text = json.dumps({"status": "error", "error_type": "runtime_error",
                           "message": f"result is not JSON-serializable: {e}", "exit_code": 1})
    sys.stdout.write("\n" + job["nonce"] + text)
    sys.stdout.flush()

_main()
