// Jobs: filters, search, pagination, a submit form, and bulk retry/cancel (the selected rows,
// or every job matching the filters through POST /v1/jobs/bulk).
import { api } from "../api.js";
import { h, put, time, badge, short, failure, toast, button, json } from "../dom.js";

const STATUSES = ["", "scheduled", "queued", "running", "succeeded", "failed", "canceled"];
const FILTERS = ["status", "kind", "queue", "tag"];

/** `input.customer=42 tag=user:1 kind=echo` → query pairs; a UUID opens the job. */
function parseSearch(text) {
  const pairs = [];
  for (const word of text.trim().split(/\s+/).filter(Boolean)) {
    const i = word.indexOf("=");
    if (i > 0) pairs.push([word.slice(0, i), word.slice(i + 1)]);
    else pairs.push(["kind", word]);
  }
  return pairs;
}

function field(id, label, control) {
  return h("div", { class: "field" }, h("label", { for: id }, label), control);
}

function submitForm(onDone) {
  const kind = h("select", { id: "submit-kind", name: "kind" });
  const queue = h("input", { id: "submit-queue", name: "queue", placeholder: "default" });
  const input = h("textarea", { id: "submit-input", name: "input", rows: 3, spellcheck: "false" }, "{}");
  api("/v1/kinds")
    .then((page) => {
      for (const k of page.items) kind.append(h("option", { value: k.name }, k.name));
      kind.value = "echo";
    })
    .catch(() => kind.append(h("option", { value: "echo" }, "echo")));
  const form = h(
    "form",
    { class: "inline-form", "aria-label": "Submit a job" },
    field("submit-kind", "Kind", kind),
    field("submit-queue", "Queue", queue),
    field("submit-input", "Input (JSON)", input),
    h("button", { type: "submit" }, "Submit job"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    let body;
    try {
      body = { kind: kind.value, input: JSON.parse(input.value || "{}") };
    } catch {
      toast("The input is not valid JSON.", "error");
      return;
    }
    if (queue.value.trim()) body.queue = queue.value.trim();
    try {
      const job = await api("/v1/jobs", { method: "POST", body });
      toast(`Submitted job ${short(job.id)}.`);
      onDone(job);
    } catch (err) {
      toast(err.message, "error");
    }
  });
  return h("details", { class: "panel" }, h("summary", {}, "Submit a job"), form);
}

export async function render(main, { me, params }) {
  const filters = Object.fromEntries(FILTERS.map((f) => [f, params.get(f) || ""]));
  const search = params.get("q") || "";
  const status = h("select", { id: "f-status", name: "status" }, STATUSES.map((s) => h("option", { value: s }, s || "any")));
  status.value = filters.status;
  const kind = h("input", { id: "f-kind", name: "kind", value: filters.kind });
  const queue = h("input", { id: "f-queue", name: "queue", value: filters.queue });
  const tag = h("input", { id: "f-tag", name: "tag", value: filters.tag, placeholder: "key:value" });
  const q = h("input", { id: "f-q", name: "q", type: "search", value: search, placeholder: "job id or input.path=value" });
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter jobs" },
    field("f-status", "Status", status),
    field("f-kind", "Kind", kind),
    field("f-queue", "Queue", queue),
    field("f-tag", "Tag", tag),
    field("f-q", "Search", q),
    h("button", { type: "submit" }, "Apply"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (/^[0-9a-f-]{36}$/i.test(q.value.trim())) {
      location.hash = `#/jobs/${q.value.trim()}`;
      return;
    }
    const p = new URLSearchParams();
    for (const [k, el] of [["status", status], ["kind", kind], ["queue", queue], ["tag", tag], ["q", q]]) {
      if (el.value.trim()) p.set(k, el.value.trim());
    }
    location.hash = `#/jobs?${p}`;
  });

  const query = new URLSearchParams({ limit: "25" });
  for (const f of FILTERS) if (filters[f]) query.set(f, filters[f]);
  for (const [k, v] of parseSearch(search)) query.append(k, v);

  const list = h("div", { "aria-live": "polite" });
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  const cursors = [null];
  let page = 0;
  let selected = new Set();
  let current = [];

  const bulkBar = me.can.submit
    ? h(
        "div",
        { class: "actions" },
        button("Retry selected", () => each("retry")),
        button("Cancel selected", () => each("cancel")),
        button("Cancel all matching", () => bulk("cancel")),
        button("Retry all matching", () => bulk("retry")),
      )
    : null;

  async function each(action) {
    if (!selected.size) return toast("Select jobs first.");
    const results = await Promise.allSettled(
      [...selected].map((id) => api(`/v1/jobs/${id}/${action}`, { method: "POST" })),
    );
    const ok = results.filter((r) => r.status === "fulfilled").length;
    toast(`${action}: ${ok} of ${results.length} done.`);
    await load();
  }

  async function bulk(action) {
    const filter = {};
    for (const f of ["status", "kind", "queue"]) if (filters[f]) filter[f] = filters[f];
    if (filters.tag) filter.tag = [filters.tag];
    if (!Object.keys(filter).length) return toast("Set a filter first: bulk actions need one.", "error");
    if (!confirm(`${action} every job matching ${JSON.stringify(filter)}?`)) return;
    const op = await api("/v1/jobs/bulk", { method: "POST", body: { action, filter } });
    toast(`Bulk ${action} started (operation ${short(op.id)}).`);
  }

  async function load() {
    const qp = new URLSearchParams(query);
    if (cursors[page]) qp.set("cursor", cursors[page]);
    let res;
    try {
      res = await api(`/v1/jobs?${qp}`);
    } catch (e) {
      put(list, failure(e));
      return;
    }
    current = res.items;
    cursors[page + 1] = res.next_cursor || null;
    selected = new Set();
    const all = h("input", { type: "checkbox", "aria-label": "Select all jobs on this page" });
    all.addEventListener("change", () => {
      for (const c of list.querySelectorAll("tbody input[type=checkbox]")) {
        c.checked = all.checked;
        c.dispatchEvent(new Event("change"));
      }
    });
    const rows = current.map((j) => {
      const box = h("input", { type: "checkbox", "aria-label": `Select job ${short(j.id)}` });
      box.addEventListener("change", () => (box.checked ? selected.add(j.id) : selected.delete(j.id)));
      return h(
        "tr",
        { "data-job": j.id },
        me.can.submit ? h("td", { "data-label": "Select" }, box) : null,
        h("td", { "data-label": "Job" }, h("a", { href: `#/jobs/${j.id}` }, short(j.id))),
        h("td", { "data-label": "Kind" }, j.kind),
        h("td", { "data-label": "Queue" }, j.queue),
        h("td", { "data-label": "Status" }, badge(j.status)),
        h("td", { "data-label": "Attempt" }, `${j.attempt}/${j.max_attempts}`),
        h("td", { "data-label": "Created" }, time(j.created_at)),
      );
    });
    put(
      list,
      current.length
        ? h(
            "div",
            { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Jobs" },
            h(
              "table",
              {},
              h("caption", {}, "Jobs, newest first"),
              h(
                "thead",
                {},
                h(
                  "tr",
                  {},
                  me.can.submit ? h("th", { scope: "col" }, all) : null,
                  ["Job", "Kind", "Queue", "Status", "Attempt", "Created"].map((c) => h("th", { scope: "col" }, c)),
                ),
              ),
              h("tbody", {}, rows),
            ),
          )
        : h("p", { class: "empty" }, "No jobs match."),
    );
    const prev = h("button", { type: "button", disabled: page === 0 }, "Previous");
    prev.addEventListener("click", () => {
      page -= 1;
      load();
    });
    const next = h("button", { type: "button", disabled: !cursors[page + 1] }, "Next");
    next.addEventListener("click", () => {
      page += 1;
      load();
    });
    put(pager, prev, h("span", {}, `Page ${page + 1}`), next);
  }

  put(
    main,
    h("h1", {}, "Jobs"),
    me.can.submit ? submitForm((job) => (location.hash = `#/jobs/${job.id}`)) : null,
    form,
    bulkBar,
    list,
    pager,
  );
  await load();
  const timer = setInterval(() => {
    if (!selected.size) load();
  }, 5000);
  return () => clearInterval(timer);
}

export { json };
