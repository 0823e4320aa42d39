// One job: status, progress, input/output, attempts, a live timeline of its events (SSE with a
// stream token), logs, artifacts (audio plays in the page), cancel and retry.
import { api, blob, follow } from "../api.js";
import { h, put, time, badge, json, failure, toast, button, section, table } from "../dom.js";

const TERMINAL_STATUS = new Set(["succeeded", "failed", "canceled"]);

function describe(e) {
  const d = e.data || {};
  switch (e.type) {
    case "JobStarted":
      return `attempt ${d.attempt} on ${d.worker}`;
    case "JobQueued":
      return d.reason || "";
    case "JobProgress":
      return [d.percent !== undefined ? `${d.percent}%` : "", d.message || ""].join(" ").trim();
    case "JobLog":
      return `[${d.level}] ${d.message}`;
    case "JobAttemptFailed":
    case "JobFailed":
      return `attempt ${d.attempt}: ${d.error?.type || ""} ${d.error?.message || ""}`;
    case "JobSucceeded":
      return `attempt ${d.attempt}`;
    case "JobCancelRequested":
      return d.reason || "";
    default:
      return "";
  }
}

export async function render(main, { me, args: [id] }) {
  let job = await api(`/v1/jobs/${id}`);
  const head = h("div");
  const progress = h("div");
  const details = h("div");
  const timeline = h("ol", { class: "timeline", "aria-label": "Events", "aria-live": "polite" });
  const logs = h("pre", { class: "logs", "aria-label": "Logs", tabindex: "0" });
  const attempts = h("div");
  const artifacts = h("div");
  const actions = h("div", { class: "actions" });
  const events = [];

  const draw = () => {
    put(
      head,
      h("h1", {}, "Job ", h("code", {}, job.id)),
      h(
        "p",
        { class: "status-line" },
        "Status: ",
        h("span", { "data-testid": "job-status" }, badge(job.status)),
        ` · ${job.kind} on queue ${job.queue} · attempt ${job.attempt}/${job.max_attempts}`,
        job.run_id ? [" · run ", h("a", { href: `#/runs/${job.run_id}` }, job.run_id.slice(-8))] : null,
      ),
    );
    const pct = job.status === "succeeded" ? 100 : (job.progress?.percent ?? 0);
    put(
      progress,
      h("label", { for: "job-progress" }, `Progress ${Math.round(pct)}%`, job.progress?.message ? ` — ${job.progress.message}` : ""),
      h("progress", { id: "job-progress", max: "100", value: String(pct) }, `${pct}%`),
    );
    put(
      details,
      h(
        "dl",
        { class: "facts" },
        [
          ["Created", time(job.created_at)],
          ["Queued", time(job.queued_at)],
          ["Started", time(job.started_at)],
          ["Finished", time(job.finished_at)],
          ["Worker", job.worker_id || "—"],
          ["Tags", Object.entries(job.tags || {}).map(([k, v]) => `${k}:${v}`).join(", ") || "—"],
        ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
      ),
      h("div", { class: "cols" }, section("Input", json(job.input)), section("Output", job.error ? json(job.error) : json(job.output))),
    );
    put(actions);
    if (me.can.submit) {
      if (["scheduled", "queued", "running"].includes(job.status)) {
        actions.append(
          button("Cancel job", async () => {
            job = await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
            toast("Cancel requested.");
            draw();
          }),
        );
      }
      if (["failed", "canceled"].includes(job.status)) {
        actions.append(
          button("Retry job", async () => {
            job = await api(`/v1/jobs/${id}/retry`, { method: "POST" });
            toast("Queued again.");
            draw();
            restart();
          }),
        );
      }
    }
    drawArtifacts();
  };

  const drawArtifacts = () => {
    const list = job.artifacts || [];
    put(
      artifacts,
      table(
        "Artifacts",
        [
          ["Name", (a) => a.name],
          ["Type", (a) => a.content_type || "—"],
          ["Size", (a) => `${a.size} bytes`],
          [
            "Open",
            (a) => {
              const path = `/v1/jobs/${id}/artifacts/${encodeURIComponent(a.name)}`;
              const audio = /^audio\//.test(a.content_type || "") || /\.(wav|mp3|ogg)$/.test(a.name);
              const holder = h("span");
              holder.append(
                button(audio ? `Play ${a.name}` : `Download ${a.name}`, async () => {
                  const url = URL.createObjectURL(await blob(path));
                  if (audio) put(holder, h("audio", { controls: true, src: url, "aria-label": `Audio ${a.name}` }));
                  else {
                    const link = h("a", { href: url, download: a.name }, a.name);
                    put(holder, link);
                    link.click();
                  }
                }),
              );
              return holder;
            },
          ],
        ],
        list,
        { empty: "No artifacts." },
      ),
    );
  };

  const drawEvents = () => {
    const logLines = events.filter((e) => e.type === "JobLog").map((e) => `${e.recorded_at} [${e.data.level}] ${e.data.message}`);
    put(logs, logLines.length ? logLines.join("\n") : "No logs.");
    const tries = events.filter((e) => ["JobStarted", "JobAttemptFailed", "JobSucceeded", "JobFailed"].includes(e.type));
    put(
      attempts,
      table(
        "Attempts",
        [
          ["Attempt", (e) => e.data.attempt],
          ["Event", (e) => e.type],
          ["At", (e) => time(e.recorded_at)],
          ["Detail", (e) => describe(e)],
        ],
        tries,
        { empty: "Not started yet." },
      ),
    );
  };

  const onEvent = async (e) => {
    events.push(e);
    timeline.append(
      h("li", { "data-type": e.type }, h("span", { class: "ev" }, e.type), " ", time(e.recorded_at), " ", h("span", { class: "muted" }, describe(e))),
    );
    drawEvents();
    if (e.type === "JobProgress" && e.data) {
      job.progress = { percent: e.data.percent, message: e.data.message };
      draw();
    } else if (e.type !== "JobLog" && e.type !== "JobOutputChunk") {
      try {
        job = await api(`/v1/jobs/${id}`);
        draw();
      } catch (err) {
        toast(err.message, "error");
      }
    }
  };

  let stop = null;
  const restart = () => {
    if (stop) stop();
    events.length = 0;
    put(timeline);
    stop = follow(`/v1/jobs/${id}/events`, onEvent, {
      // The server closes the stream after a terminal event; follow on only if the job was
      // queued again since (a retry).
      reconnect: async () => {
        job = await api(`/v1/jobs/${id}`);
        draw();
        return !TERMINAL_STATUS.has(job.status);
      },
    });
  };

  put(
    main,
    head,
    progress,
    actions,
    details,
    section("Attempts", attempts),
    section("Timeline (live)", timeline),
    section("Logs", logs),
    section("Artifacts", artifacts),
  );
  draw();
  restart();
  return () => stop && stop();
}

export { failure };
