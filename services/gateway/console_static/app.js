// The console: sign in with an API key, then pages by URL hash (#/overview, ...). A
// page's refresh() runs every REFRESH_MS while it is shown; the event stream is followed
// once for the whole tab and feeds every page.
import { api, followEvents, forgetKey, saveKey, savedKey } from "./api.js";
import breakdown from "./breakdown.js";
import { clear, h } from "./dom.js";
import events from "./events.js";
import functions from "./functions.js";
import overview from "./overview.js";
import { addEvent, reset } from "./store.js";
import topology from "./topology.js";
import workflows from "./workflows.js";

const PAGES = { overview, topology, functions, workflows, events, breakdown };
const REFRESH_MS = 2000;
const STATES = { live: "events: live", reconnecting: "events: reconnecting…", denied: "events: not allowed for this key" };

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const live = document.getElementById("live");
const signout = document.getElementById("signout");

let current = null; // { name, page handle }
let timer = null;
let stream = null; // AbortController of the event stream

function pageName() {
  const name = location.hash.replace(/^#\/?/, "");
  return name in PAGES ? name : "overview";
}

function showError(err) {
  const old = main.querySelector(".page-error");
  if (old) old.remove();
  if (err) main.prepend(h("p", { class: "page-error error", role: "alert" }, `${err.status ?? ""} ${err.message}`));
}

async function refresh() {
  const handle = current?.handle;
  if (!handle?.refresh) return;
  try {
    await handle.refresh();
    if (current?.handle === handle) showError(null);
  } catch (err) {
    if (err.status === 401) return signOut("That key is not valid any more.");
    if (current?.handle === handle) showError(err);
  } finally {
    if (current?.handle === handle) timer = setTimeout(refresh, REFRESH_MS);
  }
}

function show() {
  clearTimeout(timer);
  current?.handle?.unmount?.();
  const name = pageName();
  const page = PAGES[name];
  document.title = `${page.title} · gpufaas console`;
  for (const a of nav.querySelectorAll("a")) {
    if (a.dataset.page === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  current = { name, handle: page.mount(main) };
  refresh();
}

function start() {
  nav.hidden = false;
  signout.hidden = false;
  stream = new AbortController();
  followEvents(addEvent, (state) => (live.textContent = STATES[state]), stream.signal);
  window.addEventListener("hashchange", show);
  show();
}

function signOut(why) {
  forgetKey();
  stream?.abort();
  reset();
  clearTimeout(timer);
  current?.handle?.unmount?.();
  current = null;
  window.removeEventListener("hashchange", show);
  nav.hidden = true;
  signout.hidden = true;
  live.textContent = "";
  login(why);
}

function login(why) {
  const key = h("input", { id: "api-key", type: "password", autocomplete: "off", spellcheck: "false", size: 48 });
  const note = h("p", { id: "login-error", class: "error", role: "alert" }, why || "");
  const submit = async (ev) => {
    ev.preventDefault();
    saveKey(key.value.trim());
    try {
      await api("/v1/functions");
    } catch (err) {
      forgetKey();
      note.textContent = err.status === 401 ? "That key is not valid." : `${err.status ?? ""} ${err.message}`;
      return;
    }
    start();
  };
  clear(
    main,
    h("h2", {}, "Sign in"),
    h(
      "form",
      { class: "login", onsubmit: submit },
      h("label", { for: "api-key" }, "API key"),
      key,
      h("button", { type: "submit", id: "sign-in" }, "Sign in"),
    ),
    h(
      "p",
      { class: "muted" },
      "The key ", h("code", {}, "gpufaas up"), " printed (an admin key: the whole platform) or one from ",
      h("code", {}, "gpufaas keys create"), " (a tenant's: its own functions and events). It is kept in this tab only; leave it empty for a platform started with ",
      h("code", {}, "--no-auth"), ".",
    ),
    note,
  );
  key.focus();
}

signout.addEventListener("click", () => signOut(""));
if (savedKey() !== null) start();
else login("");
