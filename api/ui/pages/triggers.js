// Triggers: inbound webhook endpoints that start jobs or runs, with their counters.
import { api } from "../api.js";
import { h, put, table, time, badge, json } from "../dom.js";

export async function render(main) {
  const page = await api("/v1/triggers?limit=100");
  put(
    main,
    h("h1", {}, "Triggers"),
    table(
      "Triggers",
      [
        ["Name", (t) => t.name],
        ["Status", (t) => badge(t.status)],
        ["Hook URL", (t) => h("code", { class: "wrap" }, t.url)],
        ["Target", (t) => json(t.target)],
        ["Auth", (t) => t.auth?.type || "none"],
        ["Invocations", (t) => t.invocations],
        ["Rejections", (t) => t.rejections],
        ["Rate / min", (t) => t.rate_limit_per_minute],
        ["Created", (t) => time(t.created_at)],
      ],
      page.items,
      { empty: "No triggers." },
    ),
  );
}
