// Small DOM helpers: elements from data (no innerHTML with data, so no injection), tables,
// time formatting, status badges.

/** An element: h("a", {href: "#/x", class: "c"}, "text", child, …). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replace the children of `el`. */
export function put(el, ...children) {
  el.replaceChildren();
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A table: columns are [header, item => cell]; `caption` names it for screen readers. */
export function table(caption, columns, items, { empty = "Nothing yet." } = {}) {
  if (!items.length) return h("p", { class: "empty" }, empty);
  return h(
    "div",
    // Focusable: a region that scrolls sideways must be reachable from the keyboard.
    { class: "table-wrap", tabindex: "0", role: "region", "aria-label": `${caption} (table)` },
    h(
      "table",
      {},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, columns.map(([name]) => h("th", { scope: "col" }, name)))),
      h(
        "tbody",
        {},
        items.map((it) => h("tr", {}, columns.map(([name, f]) => h("td", { "data-label": name }, f(it))))),
      ),
    ),
  );
}

export function time(t) {
  if (!t) return "—";
  const d = new Date(t);
  return h("time", { datetime: t, title: d.toISOString() }, d.toLocaleString());
}

export function ago(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function since(t) {
  return t ? ago((Date.now() - new Date(t).getTime()) / 1000) + " ago" : "—";
}

export function badge(status) {
  return h("span", { class: `badge s-${status}` }, status);
}

export function json(v) {
  return h("pre", { class: "json", tabindex: "0" }, v === undefined ? "—" : JSON.stringify(v, null, 2));
}

/** The last 8 hex digits of an id: ids are UUIDv7, whose first digits are a timestamp shared
 * by everything made in the same moment. */
export function short(id) {
  return id ? String(id).slice(-8) : "—";
}

export function link(href, text) {
  return h("a", { href }, text);
}

export function section(title, ...children) {
  return h("section", { "aria-label": title }, h("h2", {}, title), ...children);
}

/** A message in the live region. */
export function toast(msg, kind = "info") {
  const t = document.getElementById("toast");
  put(t, h("p", { class: `toast ${kind}` }, msg));
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => put(t), 6000);
}

/** An error as a page message. */
export function failure(e) {
  return h("p", { class: "error", role: "alert" }, e.message || String(e));
}

/** A button that runs `action`, disabled while it runs; errors go to the toast. */
export function button(label, action, attrs = {}) {
  const b = h("button", { type: "button", ...attrs }, label);
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await action();
    } catch (e) {
      toast(e.message, "error");
    } finally {
      b.disabled = false;
    }
  });
  return b;
}
