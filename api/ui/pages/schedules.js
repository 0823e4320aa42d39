// Schedules: cron, next fire times, counters, and each schedule's tick history (fired or
// skipped and why) from the event log.
import { api } from "../api.js";
import { h, put, table, time, badge, short, section, button, toast } from "../dom.js";

async function ticks() {
  const out = [];
  let after = null;
  for (let i = 0; i < 5; i++) {
    const q = new URLSearchParams({ stream_type: "schedule", types: "TickFired,TickSkipped,TickBuffered", limit: "500" });
    if (after) q.set("after", after);
    const page = await api(`/v1/events?${q}`);
    out.push(...page.items);
    if (!page.items.length || !page.next_cursor) break;
    after = page.next_cursor;
  }
  return out;
}

export async function render(main, { me }) {
  const [page, history] = await Promise.all([api("/v1/schedules?limit=100"), ticks().catch(() => [])]);
  const bySchedule = new Map();
  for (const e of history) (bySchedule.get(e.stream_id) || bySchedule.set(e.stream_id, []).get(e.stream_id)).push(e);
  const actions = (s) => {
    if (!me.can.submit) return "—";
    return h(
      "span",
      { class: "actions" },
      button(s.status === "paused" ? "Resume" : "Pause", async () => {
        await api(`/v1/schedules/${s.id}/${s.status === "paused" ? "resume" : "pause"}`, { method: "POST" });
        toast("Done.");
        render(main, { me });
      }, { "aria-label": `${s.status === "paused" ? "Resume" : "Pause"}: ${s.name}` }),
      button("Fire now", async () => {
        await api(`/v1/schedules/${s.id}/trigger`, { method: "POST" });
        toast("Fired.");
        render(main, { me });
      }, { "aria-label": `Fire now: ${s.name}` }),
    );
  };
  put(
    main,
    h("h1", {}, "Schedules"),
    table(
      "Schedules",
      [
        ["Name", (s) => s.name],
        ["Cron", (s) => h("code", {}, s.cron)],
        ["Time zone", (s) => s.timezone || s.tz || "UTC"],
        ["Status", (s) => badge(s.status)],
        ["Next fire times", (s) => h("ul", { class: "plain" }, (s.next_fire_times || []).slice(0, 3).map((t) => h("li", {}, time(t))))],
        ["Last fired", (s) => time(s.last_fire_time)],
        ["Fired / skipped", (s) => `${s.fired_count} / ${s.skipped_count}`],
        ["Actions", actions],
      ],
      page.items,
      { empty: "No schedules." },
    ),
    page.items.map((s) =>
      section(
        `Ticks of ${s.name}`,
        table(
          `Tick history of ${s.name}, newest first`,
          [
            ["Tick", (e) => time(e.data.fire_time)],
            ["Outcome", (e) => (e.type === "TickFired" ? badge("fired") : e.type === "TickSkipped" ? badge("skipped") : badge("buffered"))],
            [
              "Why",
              (e) =>
                e.type === "TickFired"
                  ? [e.data.trigger, e.data.job_id ? [" → job ", h("a", { href: `#/jobs/${e.data.job_id}` }, short(e.data.job_id))] : null]
                  : e.type === "TickSkipped"
                    ? `${e.data.reason}${e.data.count > 1 ? ` (${e.data.count} ticks)` : ""}`
                    : "held by overlap: buffer_one",
            ],
          ],
          (bySchedule.get(s.id) || []).slice(-20).reverse(),
          { empty: "No ticks yet." },
        ),
      ),
    ),
  );
}
