// Runs one code.run job inside quickjs.wasm (`qjs --std -e <this file>`). The job arrives as
// JSON on stdin: {code, context, nonce, check}. The report goes to stdout after `nonce`, so the
// host can tell it from what the user's code printed.
(function () {
  // os.sleep in short steps, so the wall-clock timeout is checked between them.
  // (`os` is a read-only module namespace: the global gets a copy with the wrapped sleep.)
  var realSleep = os.sleep;
  var osCopy = {};
  for (var k in os) osCopy[k] = os[k];
  globalThis.os = osCopy;
  osCopy.sleep = function (ms) {
    var end = Date.now() + ms;
    for (;;) {
      var left = end - Date.now();
      if (left <= 0) return;
      realSleep(Math.min(left, 10));
    }
  };
  var job = JSON.parse(std.in.readAsString());
  var report;
  function where(e) {
    var m = /:(\d+):(\d+)/.exec((e && e.stack) || "");
    if (m) return { line: Number(m[1]), column: Number(m[2]) };
    if (e && typeof e.lineNumber === "number") return { line: e.lineNumber, column: e.columnNumber };
    return {};
  }
  function describe(e) {
    if (e instanceof Error) return e.name + ": " + e.message;
    try { return "Uncaught " + JSON.stringify(e); } catch (_) { return "Uncaught " + String(e); }
  }
  // `context`, and each top-level key of a `context` object as a global of its own
  // ({"x": 5} -> x) when the key is an ASCII identifier, not a reserved word (nor `arguments`
  // or `eval`), not `context` or `result`, and not a global already (JSON, Math, std, os,
  // console, …: the runtime needs them). Every key stays reachable as context[key]
  // (docs/code.md). The word list is only built for an object context (runs are metered).
  function bindContext(context) {
    if (context !== null && typeof context === "object" && !Array.isArray(context)) {
      var reserved = " await break case catch class const continue debugger default delete do " +
        "else enum export extends false finally for function if implements import in " +
        "instanceof interface let new null package private protected public return static " +
        "super switch this throw true try typeof var void while with yield arguments eval " +
        "context result ";
      for (var key in context) {
        if (Object.prototype.hasOwnProperty.call(context, key) &&
            /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(key) && reserved.indexOf(" " + key + " ") < 0 &&
            !(key in globalThis)) {
          globalThis[key] = context[key];
        }
      }
    }
    globalThis.context = context;
  }
  if (job.check) {
    try {
      std.evalScript(job.code, { compile_only: true });
      report = { valid: true };
    } catch (e) {
      var w = where(e);
      report = { valid: false, message: describe(e), line: w.line, column: w.column };
    }
  } else {
    bindContext(job.context);
    try {
      std.evalScript(job.code);
      var result = std.evalScript("typeof result === 'undefined' ? undefined : result");
      report = { status: "ok", exit_code: 0 };
      if (result !== undefined) report.result = result;
    } catch (e) {
      var oom = e instanceof Error && /out of memory/.test(e.message);
      var w = where(e);
      report = {
        status: "error",
        error_type: oom ? "memory_limit" : "runtime_error",
        message: describe(e),
        traceback: (e && e.stack) ? describe(e) + "\n" + e.stack : describe(e),
        line: w.line, column: w.column, exit_code: 1
      };
    }
  }
  std.out.flush();
  std.err.flush();
  var text;
  try {
    text = JSON.stringify(report);
  } catch (e) {
    text = JSON.stringify({ status: "error", error_type: "runtime_error",
      message: "result is not JSON-serializable: " + describe(e), exit_code: 1 });
  }
  std.out.puts("\n" + job.nonce + text);
  std.out.flush();
  // Timers and promises left pending do not run after the report.
  std.exit(0);
})();
