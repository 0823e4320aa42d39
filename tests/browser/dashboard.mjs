// The dashboard in a real browser (Debian's chromium, headless, driven by playwright-core):
// sign in, submit a job and watch it finish live, open a run's DAG, start a run and watch its
// DAG change live, play a TTS job's audio, cancel a running job,
// redeliver a failed delivery, check a read-only key sees no buttons that would fail, and
// check every page at 1280×800 and on a phone with axe-core (no serious or critical
// violations). Screenshots of each page go to CAPIBARA_UI_SCREENSHOTS.
//
// Run by tests/tests/e2e/dashboard.rs, which starts the servers, makes the data and passes:
//   CAPIBARA_UI_URL, CAPIBARA_UI_ADMIN_KEY, CAPIBARA_UI_READ_KEY, CAPIBARA_UI_RUN_ID,
//   CAPIBARA_UI_RUNNING_JOB_ID, CAPIBARA_UI_DELIVERY_ID, CAPIBARA_UI_TTS_JOB_ID,
//   CAPIBARA_UI_SCREENSHOTS,
//   CAPIBARA_UI_NODE_MODULES (where playwright-core and axe-core are), CAPIBARA_UI_CHROMIUM.
import { createRequire } from "node:module";
import { mkdirSync, readFileSync } from "node:fs";
import path from "node:path";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const modules = env("CAPIBARA_UI_NODE_MODULES");
const require = createRequire(path.join(modules, "noop.js"));
const { chromium } = require("playwright-core");
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

const BASE = env("CAPIBARA_UI_URL");
const SHOTS = env("CAPIBARA_UI_SCREENSHOTS");
mkdirSync(SHOTS, { recursive: true });

const problems = [];
const step = async (name, f) => {
  const t0 = Date.now();
  try {
    await f();
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    console.log(`FAIL ${name}: ${e.stack || e}`);
    problems.push(name);
  }
};

const browser = await chromium.launch({
  executablePath: process.env.CAPIBARA_UI_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Root in a container has no user namespaces for Chromium's sandbox.
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});

async function newPage(viewport, name) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1, isMobile: viewport.width < 500, hasTouch: viewport.width < 500 });
  const page = await context.newPage();
  page.on("console", (m) => {
    // A CSP violation or a script error is a failure, wherever it happens.
    if (m.type() === "error" && !/Failed to load resource/.test(m.text())) {
      console.log(`[${name} console] ${m.text()}`);
      if (/Content Security Policy|SyntaxError|TypeError|ReferenceError/.test(m.text())) problems.push(`console: ${m.text()}`);
    }
  });
  page.on("pageerror", (e) => {
    console.log(`[${name} pageerror] ${e.message}`);
    problems.push(`pageerror: ${e.message}`);
  });
  return page;
}

async function signIn(page, key) {
  await page.goto(`${BASE}/ui/`);
  await page.getByLabel("API key").fill(key);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("navigation", { name: "Main" }).waitFor();
}

async function go(page, hash) {
  await page.evaluate((h) => (location.hash = h), hash);
  await page.waitForFunction(() => !document.querySelector("main")?.textContent.startsWith("Loading"));
  await page.waitForTimeout(300);
}

/** axe-core in the page (evaluated over the DevTools protocol, so the page's CSP stays on). */
async function axe(page, label) {
  await page.evaluate(axeSource);
  const result = await page.evaluate(() =>
    // eslint-disable-next-line no-undef
    axe.run(document, { resultTypes: ["violations"], runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"] } }),
  );
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  for (const v of result.violations) {
    console.log(`  axe ${label}: ${v.impact} ${v.id}: ${v.help} (${v.nodes.length}) ${v.nodes.slice(0, 2).map((n) => n.target.join(" ")).join(" | ")}`);
  }
  if (bad.length) throw new Error(`${label}: ${bad.length} serious accessibility violations: ${bad.map((v) => v.id).join(", ")}`);
}

/** Nothing wider than the viewport except inside scrolling wrappers. */
async function fits(page, label) {
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 2) throw new Error(`${label}: the page is ${overflow}px wider than the viewport`);
}

const PAGES = [
  ["overview", "#/"],
  ["workers", "#/workers"],
  ["jobs", "#/jobs"],
  ["job", `#/jobs/${env("CAPIBARA_UI_RUNNING_JOB_ID")}`],
  ["workflows", "#/workflows"],
  ["run", `#/runs/${env("CAPIBARA_UI_RUN_ID")}`],
  ["schedules", "#/schedules"],
  ["triggers", "#/triggers"],
  ["deliveries", "#/deliveries"],
  ["subscriptions", "#/subscriptions"],
];

const desktop = await newPage({ width: 1280, height: 800 }, "desktop");

await step("sign-in page is accessible; a wrong key is refused", async () => {
  await desktop.goto(`${BASE}/ui/`);
  await desktop.getByLabel("API key").waitFor();
  await desktop.screenshot({ path: path.join(SHOTS, "signin.png") });
  await axe(desktop, "signin");
  await desktop.getByLabel("API key").fill("not-a-key");
  await desktop.getByRole("button", { name: "Sign in" }).click();
  await desktop.getByText("That key was not accepted.").waitFor();
});

await step("sign in with the admin key", async () => {
  await signIn(desktop, env("CAPIBARA_UI_ADMIN_KEY"));
  await desktop.getByRole("heading", { name: "Overview" }).waitFor();
  await desktop.getByRole("cell", { name: "default" }).first().waitFor();
});

await step("submit a job from the page and watch it go from queued to succeeded live", async () => {
  await go(desktop, "#/jobs");
  await desktop.evaluate(() => (window.__noReload = true));
  await desktop.getByText("Submit a job").click();
  await desktop.getByLabel("Kind").first().selectOption("sleep");
  await desktop.getByLabel("Input (JSON)").fill('{"ms": 2500, "progress_ms": 500}');
  await desktop.getByRole("button", { name: "Submit job" }).click();
  await desktop.waitForFunction(() => /#\/jobs\/[0-9a-f-]{36}$/.test(location.hash));
  // Record every status the badge shows, from now on.
  await desktop.evaluate(() => {
    window.__seen = [];
    const note = () => {
      const s = document.querySelector("[data-testid=job-status]")?.textContent;
      if (s && window.__seen.at(-1) !== s) window.__seen.push(s);
    };
    note();
    new MutationObserver(note).observe(document.querySelector("main"), { subtree: true, childList: true, characterData: true });
  });
  await desktop.waitForFunction(() => document.querySelector("[data-testid=job-status]")?.textContent === "succeeded", null, { timeout: 30000 });
  const seen = await desktop.evaluate(() => window.__seen);
  if (!seen.some((s) => s === "queued" || s === "running")) throw new Error(`statuses seen: ${seen}`);
  if (!(await desktop.evaluate(() => window.__noReload === true))) throw new Error("the page reloaded");
  const timeline = await desktop.locator(".timeline li").allTextContents();
  if (!timeline.some((t) => t.startsWith("JobSucceeded"))) throw new Error(`timeline: ${timeline}`);
  const progress = await desktop.locator("#job-progress").getAttribute("value");
  if (progress !== "100") throw new Error(`progress ${progress}`);
  console.log(`     statuses seen live: ${seen.join(" → ")}`);
  await desktop.screenshot({ path: path.join(SHOTS, "job-succeeded.png"), fullPage: true });
});

await step("open a run's DAG with each step's status", async () => {
  await go(desktop, `#/runs/${env("CAPIBARA_UI_RUN_ID")}`);
  await desktop.locator("svg.dag g.node").first().waitFor();
  await desktop.waitForFunction(() => document.querySelector("[data-testid=run-status]")?.textContent === "succeeded", null, { timeout: 30000 });
  const nodes = await desktop.locator("svg.dag g.node").evaluateAll((gs) => gs.map((g) => `${g.dataset.step}:${g.dataset.status}`));
  if (nodes.length < 3 || !nodes.every((n) => n.endsWith(":succeeded"))) throw new Error(`nodes ${nodes}`);
  if ((await desktop.locator("svg.dag path.edge").count()) < 2) throw new Error("no edges drawn");
});

await step("start a run from the page and watch its DAG change live", async () => {
  await go(desktop, "#/workflows");
  await desktop.getByRole("button", { name: "Start slow-pipeline" }).click();
  await desktop.waitForFunction(() => /#\/runs\/[0-9a-f-]{36}$/.test(location.hash));
  await desktop.locator("svg.dag g.node").first().waitFor();
  await desktop.evaluate(() => {
    window.__steps = [];
    const note = () => {
      const s = document.querySelector('svg.dag g.node[data-step="wait"]')?.dataset.status;
      if (s && window.__steps.at(-1) !== s) window.__steps.push(s);
    };
    note();
    new MutationObserver(note).observe(document.querySelector("main"), { subtree: true, childList: true, attributes: true });
  });
  await desktop.waitForFunction(() => document.querySelector("[data-testid=run-status]")?.textContent === "succeeded", null, { timeout: 30000 });
  const seen = await desktop.evaluate(() => window.__steps);
  if (!seen.includes("running") || seen.at(-1) !== "succeeded") throw new Error(`step "wait" went ${seen}`);
  console.log(`     step "wait" seen live: ${seen.join(" → ")}`);
  await desktop.screenshot({ path: path.join(SHOTS, "run-live.png"), fullPage: true });
});

await step("play a TTS job's audio artifact in the page", async () => {
  await go(desktop, `#/jobs/${env("CAPIBARA_UI_TTS_JOB_ID")}`);
  await desktop.getByRole("button", { name: /^Play / }).click();
  const audio = desktop.locator("audio");
  await audio.waitFor();
  await desktop.waitForFunction(() => {
    const a = document.querySelector("audio");
    return a && a.readyState >= 1 && a.duration > 0;
  }, null, { timeout: 15000 });
  const src = await audio.getAttribute("src");
  if (!src.startsWith("blob:")) throw new Error(`audio src ${src}`);
});

await step("cancel a running job", async () => {
  const id = env("CAPIBARA_UI_RUNNING_JOB_ID");
  await go(desktop, `#/jobs/${id}`);
  await desktop.waitForFunction(() => document.querySelector("[data-testid=job-status]")?.textContent === "running", null, { timeout: 30000 });
  await desktop.getByRole("button", { name: "Cancel job" }).click();
  await desktop.waitForFunction(() => document.querySelector("[data-testid=job-status]")?.textContent === "canceled", null, { timeout: 30000 });
  await desktop.getByRole("button", { name: "Retry job" }).waitFor();
});

await step("see a failed delivery and redeliver it", async () => {
  const id = env("CAPIBARA_UI_DELIVERY_ID");
  await go(desktop, "#/deliveries?status=failed");
  const badge = desktop.locator(`[data-delivery="${id}"]`);
  await badge.waitFor();
  if ((await badge.textContent()) !== "failed") throw new Error(`status ${await badge.textContent()}`);
  await desktop.getByRole("button", { name: `Redeliver ${id.slice(-8)}` }).click();
  await desktop.getByText(`Delivery ${id.slice(-8)} queued again.`).waitFor();
  await go(desktop, "#/deliveries");
  await desktop.waitForFunction(
    (d) => ["pending", "failed"].includes(document.querySelector(`[data-delivery="${d}"]`)?.textContent) &&
      document.querySelector(`[data-delivery="${d}"]`).closest("tr").children[4].textContent !== "1",
    id,
    { timeout: 30000 },
  );
  await desktop.getByRole("button", { name: id.slice(-8), exact: true }).click();
  await desktop.getByRole("table", { name: "Attempts" }).waitFor();
});

for (const [viewport, size] of [["desktop", { width: 1280, height: 800 }], ["phone", { width: 390, height: 844 }]]) {
  const page = viewport === "desktop" ? desktop : await newPage(size, viewport);
  if (viewport === "phone") await signIn(page, env("CAPIBARA_UI_ADMIN_KEY"));
  for (const [name, hash] of PAGES) {
    await step(`${name} page at ${viewport} size: real data, accessible, fits`, async () => {
      await go(page, hash);
      await page.waitForTimeout(400);
      const text = await page.locator("main").textContent();
      if (/not accepted|Loading…$/.test(text)) throw new Error(`${name}: ${text.slice(0, 200)}`);
      if (await page.locator("main .error").count()) throw new Error(`${name}: ${await page.locator("main .error").first().textContent()}`);
      await page.screenshot({ path: path.join(SHOTS, `${name}-${viewport}.png`), fullPage: viewport === "desktop" });
      await axe(page, `${name} (${viewport})`);
      await fits(page, `${name} (${viewport})`);
    });
  }
}

await step("a read-only key sees no buttons that would fail", async () => {
  const page = await newPage({ width: 1280, height: 800 }, "read-only");
  await signIn(page, env("CAPIBARA_UI_READ_KEY"));
  await go(page, "#/jobs");
  for (const name of ["Submit job", "Retry selected", "Cancel selected", "Cancel all matching"]) {
    if (await page.getByRole("button", { name }).count()) throw new Error(`read-only key sees "${name}"`);
  }
  if (await page.getByText("Submit a job").count()) throw new Error("read-only key sees the submit form");
  await go(page, `#/jobs/${env("CAPIBARA_UI_RUNNING_JOB_ID")}`);
  if (await page.getByRole("button", { name: /Cancel job|Retry job/ }).count()) throw new Error("read-only key sees cancel/retry");
  await go(page, "#/deliveries");
  if (await page.getByRole("button", { name: /^Redeliver/ }).count()) throw new Error("read-only key sees Redeliver");
  await go(page, "#/workers");
  await page.getByText("needs a key with the admin role").waitFor();
  await page.screenshot({ path: path.join(SHOTS, "read-only-jobs.png") });
  // Live streams work with a read key too (stream tokens carry its read role).
  await go(page, `#/runs/${env("CAPIBARA_UI_RUN_ID")}`);
  await page.locator("svg.dag g.node").first().waitFor();
});

await browser.close();
if (problems.length) {
  console.log(`${problems.length} problem(s): ${problems.join("; ")}`);
  process.exit(1);
}
console.log("all dashboard checks passed");
