// Workers: queues, kinds, concurrency and heartbeat of each registered worker (admin keys;
// workers are shared by every namespace).
import { api } from "../api.js";
import { h, put, table, time, since, badge, failure } from "../dom.js";

export async function render(main, { me }) {
  put(main, h("h1", {}, "Workers"));
  if (!me.can.admin) {
    main.append(h("p", {}, "Listing workers needs a key with the admin role (workers serve every namespace)."));
    return;
  }
  const body = h("div");
  main.append(body);
  let timer;
  const refresh = async () => {
    try {
      const items = (await api("/v1/workers")).items;
      put(
        body,
        table(
          "Registered workers",
          [
            ["Name", (w) => w.name],
            ["Status", (w) => badge(w.status)],
            ["Queues", (w) => w.queues.join(", ") || "—"],
            ["Kinds", (w) => h("span", { class: "wrap" }, w.kinds.join(", ") || "all")],
            ["Concurrency", (w) => `${w.running} / ${w.concurrency}`],
            ["Heartbeat", (w) => since(w.last_heartbeat_at)],
            ["Host", (w) => `${w.host} (pid ${w.pid})`],
            ["Started", (w) => time(w.started_at)],
          ],
          items,
          { empty: "No workers registered." },
        ),
      );
    } catch (e) {
      put(body, failure(e));
    }
    timer = setTimeout(refresh, 5000);
  };
  await refresh();
  return () => clearTimeout(timer);
}
