// Deliveries: each webhook delivery with its status, attempts (the DeliveryAttempted events)
// and a redeliver button.
import { api } from "../api.js";
import { h, put, table, time, badge, short, failure, toast, button } from "../dom.js";

const STATUSES = ["", "waiting", "pending", "succeeded", "failed"];

export async function render(main, { me, params }) {
  const status = h("select", { id: "d-status", name: "status" }, STATUSES.map((s) => h("option", { value: s }, s || "any")));
  status.value = params.get("status") || "";
  status.addEventListener("change", () => (location.hash = status.value ? `#/deliveries?status=${status.value}` : "#/deliveries"));
  const list = h("div", { "aria-live": "polite" });
  const detail = h("div");
  put(
    main,
    h("h1", {}, "Deliveries"),
    h("div", { class: "filters" }, h("div", { class: "field" }, h("label", { for: "d-status" }, "Status"), status)),
    list,
    detail,
  );
  const show = async (id) => {
    try {
      const d = await api(`/v1/deliveries/${id}`);
      put(
        detail,
        h("h2", { id: "delivery-detail" }, `Delivery ${short(d.id)} to ${d.url}`),
        table(
          "Attempts",
          [
            ["When", (e) => time(e.recorded_at)],
            ["Status code", (e) => e.data.status_code ?? e.data.status ?? "—"],
            ["Outcome", (e) => (e.data.ok === undefined ? e.type : e.data.ok ? "ok" : "failed")],
            ["Error", (e) => e.data.error || "—"],
          ],
          d.attempts_log,
          { empty: "No attempts yet." },
        ),
      );
      detail.querySelector("h2").focus?.();
    } catch (e) {
      put(detail, failure(e));
    }
  };
  const load = async () => {
    const q = new URLSearchParams({ limit: "50" });
    if (status.value) q.set("status", status.value);
    let page;
    try {
      page = await api(`/v1/deliveries?${q}`);
    } catch (e) {
      put(list, failure(e));
      return;
    }
    put(
      list,
      table(
        "Webhook deliveries, newest first",
        [
          ["Delivery", (d) => h("button", { type: "button", class: "link", onclick: () => show(d.id) }, short(d.id))],
          ["Event", (d) => d.event_type],
          ["URL", (d) => h("span", { class: "wrap" }, d.url)],
          ["Status", (d) => h("span", { "data-delivery": d.id }, badge(d.status))],
          ["Attempts", (d) => d.attempts],
          ["Last error", (d) => (d.last_status_code ? `HTTP ${d.last_status_code} ` : "") + (d.last_error || "")],
          ["Job", (d) => (d.job_id ? h("a", { href: `#/jobs/${d.job_id}` }, short(d.job_id)) : "—")],
          [
            "Actions",
            (d) =>
              me.can.submit && ["failed", "succeeded"].includes(d.status)
                ? button("Redeliver", async () => {
                    await api(`/v1/deliveries/${d.id}/redeliver`, { method: "POST" });
                    toast(`Delivery ${short(d.id)} queued again.`);
                    await load();
                  }, { "aria-label": `Redeliver ${short(d.id)}` })
                : "—",
          ],
        ],
        page.items,
        { empty: "No deliveries." },
      ),
    );
  };
  await load();
  const timer = setInterval(load, 4000);
  return () => clearInterval(timer);
}
