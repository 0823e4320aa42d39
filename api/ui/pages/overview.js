// Overview: every queue with its depth, running, throughput (jobs finished in the last
// minute) and oldest waiting age; refreshed live every few seconds. Queues come from
// GET /v1/queues (those holding work) and from the namespace's recent jobs.
import { api } from "../api.js";
import { h, put, table, ago, failure } from "../dom.js";

async function throughput(queue) {
  const after = new Date(Date.now() - 60_000).toISOString();
  const q = new URLSearchParams({ queue, finished_after: after, limit: "500" });
  const page = await api(`/v1/jobs?${q}`);
  return page.items.length + (page.next_cursor ? "+" : "");
}

export async function render(main) {
  const body = h("div", { "aria-live": "polite" });
  const stamp = h("p", { class: "muted" });
  put(main, h("h1", {}, "Overview"), stamp, body);
  let stopped = false;
  const refresh = async () => {
    try {
      // GET /v1/queues lists queues holding work; queues of recent jobs join them (idle, but
      // with a throughput worth showing).
      const [busy, recent] = await Promise.all([api("/v1/queues"), api("/v1/jobs?limit=200")]);
      const queues = [...busy.items];
      for (const name of new Set(recent.items.map((j) => j.queue))) {
        if (!queues.some((q) => q.name === name)) {
          queues.push({ name, depth: 0, running: 0, scheduled: 0, oldest_age_s: null, paused: false });
        }
      }
      queues.sort((a, b) => a.name.localeCompare(b.name));
      const rates = await Promise.all(queues.map((q) => throughput(q.name).catch(() => "?")));
      const rows = queues.map((q, i) => ({ ...q, rate: rates[i] }));
      put(
        body,
        table(
          "Queues",
          [
            ["Queue", (q) => h("a", { href: `#/jobs?queue=${encodeURIComponent(q.name)}` }, q.name)],
            ["Depth", (q) => h("span", { class: "num", "data-testid": `depth-${q.name}` }, q.depth)],
            ["Running", (q) => h("span", { class: "num" }, q.running)],
            ["Scheduled", (q) => h("span", { class: "num" }, q.scheduled)],
            ["Finished / min", (q) => h("span", { class: "num" }, q.rate)],
            ["Oldest waiting", (q) => ago(q.oldest_age_s)],
            ["State", (q) => (q.paused ? h("span", { class: "badge s-failed" }, "paused") : "active")],
          ],
          rows,
          { empty: "No queues yet: submit a job." },
        ),
      );
      put(stamp, `Updated ${new Date().toLocaleTimeString()} · refreshes every 3 s`);
    } catch (e) {
      put(body, failure(e));
    }
    if (!stopped) timer = setTimeout(refresh, 3000);
  };
  let timer = null;
  await refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
