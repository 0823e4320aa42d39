// Workflows and their runs; a run drawn as its DAG with each step's live status (the run's SSE
// stream redraws it).
import { api, all, follow } from "../api.js";
import { h, put, table, time, badge, short, json, section, button, toast } from "../dom.js";
import { drawDag } from "../dag.js";

export async function render(main, { me }) {
  const [workflows, runs] = await Promise.all([all("/v1/workflows", 200), api("/v1/runs?limit=50")]);
  put(
    main,
    h("h1", {}, "Workflows"),
    section(
      "Definitions",
      table(
        "Workflows",
        [
          ["Name", (w) => w.name],
          ["Version", (w) => w.version],
          ["Steps", (w) => (w.versions.at(-1)?.definition.steps || []).map((s) => s.id).join(" → ")],
          ["Updated", (w) => time(w.updated_at)],
          [
            "Start",
            (w) =>
              me.can.submit
                ? button(`Start ${w.name}`, async () => {
                    const run = await api(`/v1/workflows/${w.id}/runs`, { method: "POST", body: { input: {} } });
                    location.hash = `#/runs/${run.id}`;
                  })
                : "—",
          ],
        ],
        workflows.filter((w) => !w.deleted),
        { empty: "No workflows." },
      ),
    ),
    section(
      "Recent runs",
      table(
        "Runs, newest first",
        [
          ["Run", (r) => h("a", { href: `#/runs/${r.id}` }, short(r.id))],
          ["Workflow", (r) => r.workflow_name],
          ["Status", (r) => badge(r.status)],
          ["Steps", (r) => `${r.steps.filter((s) => s.status === "succeeded").length}/${r.steps.length} done`],
          ["Created", (r) => time(r.created_at)],
        ],
        runs.items,
        { empty: "No runs." },
      ),
    ),
  );
}

const ENDED = new Set(["succeeded", "failed", "canceled"]);

export async function renderRun(main, { me, args: [id] }) {
  let run = await api(`/v1/runs/${id}`);
  const wf = await api(`/v1/workflows/${run.workflow_id}`);
  const def = wf.versions.at(-1)?.definition || { steps: [] };
  const head = h("div");
  const graph = h("div", { class: "dag-wrap", tabindex: "0", role: "region", "aria-label": "Run graph" });
  const steps = h("div");
  const actions = h("div", { class: "actions" });
  const draw = () => {
    const byId = new Map(run.steps.map((s) => [s.id, s]));
    const defs = def.steps.length ? def.steps : run.steps.map((s) => ({ id: s.id, kind: s.kind, depends_on: [] }));
    put(
      head,
      h("h1", {}, `Run of ${run.workflow_name}`),
      h("p", { class: "status-line" }, "Status: ", h("span", { "data-testid": "run-status" }, badge(run.status)), ` · `, h("code", {}, run.id)),
    );
    put(
      graph,
      drawDag(
        defs,
        (sid) => byId.get(sid)?.status || "pending",
        (sid) => (byId.get(sid)?.job_id ? `#/jobs/${byId.get(sid).job_id}` : null),
      ),
    );
    put(
      steps,
      table(
        "Steps",
        [
          ["Step", (s) => s.id],
          ["Kind", (s) => s.kind],
          ["Status", (s) => badge(s.status)],
          ["Job", (s) => (s.job_id ? h("a", { href: `#/jobs/${s.job_id}` }, short(s.job_id)) : "—")],
          ["Started", (s) => time(s.started_at)],
          ["Finished", (s) => time(s.finished_at)],
          ["Reason", (s) => s.reason || (s.error ? s.error.message || "" : "")],
        ],
        run.steps,
      ),
    );
    put(actions);
    if (me.can.submit && !ENDED.has(run.status)) {
      actions.append(button("Cancel run", async () => {
        run = await api(`/v1/runs/${id}/cancel`, { method: "POST" });
        toast("Run canceled.");
        draw();
      }));
    }
    if (me.can.submit && ["failed", "canceled"].includes(run.status)) {
      actions.append(button("Retry run", async () => {
        run = await api(`/v1/runs/${id}/retry`, { method: "POST" });
        draw();
      }));
    }
  };
  put(main, head, actions, section("Graph", graph), section("Steps", steps), section("Output", json(run.output ?? run.error ?? null)));
  draw();
  const stop = follow(`/v1/runs/${id}/events`, async () => {
    run = await api(`/v1/runs/${id}`);
    draw();
  }, {
    reconnect: async () => {
      run = await api(`/v1/runs/${id}`);
      draw();
      return !ENDED.has(run.status);
    },
  });
  return stop;
}
