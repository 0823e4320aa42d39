// The dashboard shell: sign-in, the hash router (#/jobs/…), navigation, and what the key may
// do (GET /v1/me) so pages show only the buttons that would succeed.
import { api, key, setKey } from "./api.js";
import { h, put, failure } from "./dom.js";
import * as overview from "./pages/overview.js";
import * as workers from "./pages/workers.js";
import * as jobs from "./pages/jobs.js";
import * as job from "./pages/job.js";
import * as workflows from "./pages/workflows.js";
import * as schedules from "./pages/schedules.js";
import * as triggers from "./pages/triggers.js";
import * as deliveries from "./pages/deliveries.js";
import * as subscriptions from "./pages/subscriptions.js";

const routes = [
  [/^$/, overview.render, "Overview"],
  [/^workers$/, workers.render, "Workers"],
  [/^jobs$/, jobs.render, "Jobs"],
  [/^jobs\/([^/]+)$/, job.render, "Job"],
  [/^workflows$/, workflows.render, "Workflows"],
  [/^runs\/([^/]+)$/, workflows.renderRun, "Run"],
  [/^schedules$/, schedules.render, "Schedules"],
  [/^triggers$/, triggers.render, "Triggers"],
  [/^deliveries$/, deliveries.render, "Deliveries"],
  [/^subscriptions$/, subscriptions.render, "Subscriptions"],
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let me = null;
let cleanup = null;

function signIn(message) {
  nav.hidden = true;
  put(who);
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true,
  });
  const form = h(
    "form",
    { class: "signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("p", {}, "Paste an API key. It stays in this tab only (sessionStorage) and is sent to this server's /v1 API."),
    message ? h("p", { class: "error", role: "alert" }, message) : null,
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { type: "submit" }, "Sign in"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    setKey(input.value.trim());
    try {
      me = await api("/v1/me");
    } catch (err) {
      setKey(null);
      signIn(err.status === 401 ? "That key was not accepted." : err.message);
      return;
    }
    route();
  });
  put(main, form);
  document.title = "Sign in · Capibara";
  input.focus();
}

function signOut() {
  setKey(null);
  me = null;
  if (cleanup) cleanup();
  cleanup = null;
  location.hash = "#/";
  signIn();
}

async function route() {
  put(document.getElementById("toast"));
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  if (!key()) return signIn();
  if (!me) {
    try {
      me = await api("/v1/me");
    } catch (e) {
      setKey(null);
      return signIn(e.status === 401 ? "Your key is no longer accepted." : e.message);
    }
  }
  nav.hidden = false;
  put(
    who,
    h("span", { class: "ns" }, `${me.namespace} · ${me.roles.join(", ")}`),
    h("button", { type: "button", class: "link", onclick: signOut }, "Sign out"),
  );
  const path = location.hash.replace(/^#\/?/, "").split("?")[0];
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  for (const a of nav.querySelectorAll("a")) {
    const target = a.getAttribute("href").replace(/^#\/?/, "");
    const current = target === "" ? path === "" : path === target || path.startsWith(target + "/");
    if (current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  for (const [re, render, title] of routes) {
    const m = path.match(re);
    if (m) {
      document.title = `${title} · Capibara`;
      put(main, h("p", {}, "Loading…"));
      try {
        cleanup = (await render(main, { me, args: m.slice(1), params })) || null;
      } catch (e) {
        put(main, h("h1", {}, title), failure(e));
      }
      return;
    }
  }
  put(main, h("h1", {}, "Not found"), h("p", {}, "No such page."));
}

window.addEventListener("hashchange", route);
window.addEventListener("capibara:unauthorized", () => {
  if (key()) {
    setKey(null);
    me = null;
    signIn("Your key is no longer accepted.");
  }
});
route();
