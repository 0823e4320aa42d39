// A run's DAG as SVG: steps in layers by longest path from a root (each step one layer below
// its deepest dependency), edges from each dependency, boxes coloured by live status.
const NS = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Layer of each step: 0 for roots, else 1 + the deepest dependency's layer. */
export function layers(steps) {
  const deps = new Map(steps.map((s) => [s.id, s.depends_on || []]));
  const memo = new Map();
  const depth = (id, seen = new Set()) => {
    if (memo.has(id)) return memo.get(id);
    if (seen.has(id)) return 0;
    seen.add(id);
    const d = Math.max(-1, ...(deps.get(id) || []).filter((x) => deps.has(x)).map((x) => depth(x, seen))) + 1;
    memo.set(id, d);
    return d;
  };
  for (const s of steps) depth(s.id);
  return memo;
}

/**
 * An <svg> of `steps` ({id, kind, depends_on}); `status(id)` gives each step's status and
 * `href(id)` an optional link (the step's job).
 */
export function drawDag(steps, status, href) {
  const W = 170, H = 54, GX = 40, GY = 50, PAD = 10;
  const layer = layers(steps);
  const rows = [];
  for (const s of steps) (rows[layer.get(s.id)] ||= []).push(s);
  const pos = new Map();
  const widest = Math.max(1, ...rows.map((r) => (r || []).length));
  rows.forEach((row, y) =>
    (row || []).forEach((s, x) => {
      const offset = ((widest - row.length) * (W + GX)) / 2;
      pos.set(s.id, { x: PAD + offset + x * (W + GX), y: PAD + y * (H + GY) });
    }),
  );
  const width = PAD * 2 + widest * (W + GX) - GX;
  const height = PAD * 2 + rows.length * (H + GY) - GY;
  const svg = el("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "dag",
    // Its natural size, shrunk (never stretched) to fit.
    width: String(width),
    // A group, not an image: it holds links to the steps' jobs.
    role: "group",
    "aria-label": "Workflow graph",
  });
  svg.append(el("title", {}, "Run steps and their dependencies"));
  const defs = el("defs");
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "6", markerHeight: "6", orient: "auto-start-reverse" });
  marker.append(el("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow" }));
  defs.append(marker);
  svg.append(defs);
  for (const s of steps) {
    for (const d of s.depends_on || []) {
      const a = pos.get(d), b = pos.get(s.id);
      if (!a || !b) continue;
      const x1 = a.x + W / 2, y1 = a.y + H, x2 = b.x + W / 2, y2 = b.y;
      svg.append(el("path", { d: `M ${x1} ${y1} C ${x1} ${y1 + GY / 2}, ${x2} ${y2 - GY / 2}, ${x2} ${y2}`, class: "edge", "marker-end": "url(#arrow)" }));
    }
  }
  for (const s of steps) {
    const p = pos.get(s.id);
    const st = status(s.id) || "pending";
    const g = el("g", { class: `node s-${st}`, "data-step": s.id, "data-status": st });
    g.append(el("rect", { x: p.x, y: p.y, width: W, height: H, rx: 8 }));
    g.append(el("text", { x: p.x + 10, y: p.y + 22, class: "step-id" }, s.id.length > 20 ? s.id.slice(0, 19) + "…" : s.id));
    g.append(el("text", { x: p.x + 10, y: p.y + 42, class: "step-meta" }, `${s.kind} · ${st}`));
    const link = href && href(s.id);
    if (link) {
      // Named by its visible text (step id, kind, status).
      const a = el("a", { href: link });
      a.append(g);
      svg.append(a);
    } else svg.append(g);
  }
  return svg;
}
