// Helpers shared by the test suites (kept out of test/, where `node --test` would run them).

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const SERVER = process.env.CAPIBARA_URL
  ? { url: process.env.CAPIBARA_URL, apiKey: process.env.CAPIBARA_API_KEY }
  : null;

/** `{skip}` option for suites that need the real server. */
export const needsServer = SERVER
  ? {}
  : { skip: "CAPIBARA_URL is not set: the tests against a running Capibara server are skipped" };

/** A kind name unique to this test run (tests may share one server). */
export function uniqueKind(prefix = "sdkts") {
  return `${prefix}.t${randomBytes(5).toString("hex")}`;
}

/** Poll `fn` until it returns a truthy value; throws after `timeoutMs`. */
export async function until(fn, { timeoutMs = 15000, everyMs = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A logger that keeps what it is told (for assertions) and prints nothing. */
export function memoryLogger() {
  const lines = [];
  const at = (level) => (msg) => lines.push({ level, msg });
  return { lines, debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

export const WORKER_CHILD = fileURLToPath(new URL("./worker-child.mjs", import.meta.url));

/**
 * Start `testing/worker-child.mjs` with `env` (KIND, GRACE_MS, CONCURRENCY, plus the server's
 * URL and key). Returns the child, `messages` (its JSON stdout lines, as they come), `next(pred)`
 * (resolves the first message matching `pred`, including earlier ones) and `exited`.
 */
export function spawnWorker(env) {
  const child = spawn(process.execPath, [WORKER_CHILD], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const messages = [];
  const listeners = new Set();
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  createInterface({ input: child.stdout }).on("line", (line) => {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      return;
    }
    messages.push(msg);
    for (const l of [...listeners]) l(msg);
  });
  const exited = new Promise((r) => child.on("exit", (code, signal) => r({ code, signal })));
  function next(pred, timeoutMs = 20000) {
    const found = messages.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        listeners.delete(l);
        reject(new Error(`worker child: no message matching ${pred} in ${timeoutMs} ms; stderr: ${stderr}`));
      }, timeoutMs);
      const l = (msg) => {
        if (pred(msg)) {
          clearTimeout(t);
          listeners.delete(l);
          resolve(msg);
        }
      };
      listeners.add(l);
    });
  }
  return { child, messages, next, exited, stderr: () => stderr };
}
