// The README's quick start, run as written (with a kind name of its own) against a running
// Capibara server. Skipped when CAPIBARA_URL is unset; the check that it is one self-contained
// block always runs.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

import { SERVER, needsServer, uniqueKind } from "../testing/helpers.js";

const root = fileURLToPath(new URL("..", import.meta.url));
const readme = readFileSync(`${root}/README.md`, "utf8");

function quickStart() {
  const section = readme.split("## Quick start")[1];
  return /```js\n([\s\S]*?)```/.exec(section)[1];
}

test("the README opens with one quick-start block reading the environment", () => {
  const code = quickStart();
  assert.ok(readme.indexOf("## Quick start") < readme.indexOf("## Client"));
  assert.match(code, /CAPIBARA_URL/);
  assert.match(code, /from "@capibara\/sdk"/);
  const lines = code.trim().split("\n").length;
  assert.ok(lines <= 16, `${lines} lines`);
});

test("the README quick start runs and prints the output", needsServer, async () => {
  const kind = uniqueKind("demo");
  const code = quickStart().replaceAll("demo.greet", kind);
  // Inside the package, so that `@capibara/sdk` resolves to it (a package's self-reference).
  const file = `${root}/.quickstart-${process.pid}.mjs`;
  writeFileSync(file, code);
  try {
    const { stdout } = await new Promise((resolve, reject) =>
      execFile(
        process.execPath,
        [file],
        { env: { ...process.env, CAPIBARA_URL: SERVER.url, CAPIBARA_API_KEY: SERVER.apiKey }, timeout: 30000 },
        (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve({ stdout })),
      ),
    );
    assert.match(stdout, /greeting: 'Hello, Ada!'/);
  } finally {
    rmSync(file, { force: true });
  }
});
