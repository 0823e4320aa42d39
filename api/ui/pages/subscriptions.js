// Subscriptions: webhook subscriptions with their events and filters; pause and resume.
import { api } from "../api.js";
import { h, put, table, time, badge, json, button, toast } from "../dom.js";

export async function render(main, { me }) {
  const list = h("div");
  const load = async () => {
    const page = await api("/v1/subscriptions?limit=100");
    put(
      list,
      table(
        "Webhook subscriptions",
        [
          ["URL", (s) => h("span", { class: "wrap" }, s.url)],
          ["Events", (s) => s.events.join(", ")],
          ["Filter", (s) => json(s.filter)],
          ["Status", (s) => badge(s.status)],
          ["Created", (s) => time(s.created_at)],
          ["Deliveries", (s) => h("a", { href: `#/deliveries?subscription_id=${s.id}` }, "deliveries")],
          [
            "Actions",
            (s) =>
              me.can.admin || me.can.submit
                ? button(s.status === "paused" ? "Resume" : "Pause", async () => {
                    await api(`/v1/subscriptions/${s.id}/${s.status === "paused" ? "resume" : "pause"}`, { method: "POST" });
                    toast("Done.");
                    await load();
                  })
                : "—",
          ],
        ],
        page.items,
        { empty: "No subscriptions." },
      ),
    );
  };
  put(main, h("h1", {}, "Subscriptions"), list);
  await load();
}
