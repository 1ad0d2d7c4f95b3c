// Events: the live stream (what this console has seen, newest first), filtered by kind
// and by function.
import { clear, clock, h } from "./dom.js";
import { events, onEvent } from "./store.js";

const SHOWN = 200;

function summary(data) {
  const rest = { ...data };
  delete rest.function;
  // Without the messages' version tags ("type": "breakdown.v1"): noise to a reader.
  const text = JSON.stringify(rest, (k, v) => (k === "type" ? undefined : v));
  return text.length > 160 ? `${text.slice(0, 160)}…` : text;
}

function row(e) {
  return h(
    "tr",
    { "data-kind": e.kind },
    h("td", { class: "nowrap" }, clock(e.time)),
    h("td", { class: "nowrap" }, e.kind),
    h("td", {}, e.data?.function ?? ""),
    h("td", { class: "nowrap" }, e.source),
    h("td", { class: "json" }, summary(e.data || {})),
  );
}

export default {
  title: "Events",
  mount(root) {
    const kind = h("select", { id: "ev-kind" }, h("option", { value: "" }, "all kinds"));
    const fn = h("input", { id: "ev-function", type: "search", placeholder: "any function", autocomplete: "off" });
    const count = h("span", { class: "muted", role: "status" });
    const body = h("tbody", { id: "events-body" });
    const kinds = new Set();
    const draw = () => {
      for (const e of events()) {
        if (!kinds.has(e.kind)) {
          kinds.add(e.kind);
          const chosen = kind.value;
          clear(kind, h("option", { value: "" }, "all kinds"), [...kinds].sort().map((k) => h("option", { value: k }, k)));
          kind.value = chosen;
        }
      }
      const want = fn.value.trim();
      const shown = events()
        .filter((e) => (!kind.value || e.kind === kind.value) && (!want || (e.data?.function ?? "").includes(want)))
        .slice(-SHOWN)
        .reverse();
      clear(body, shown.map(row));
      clear(count, `${shown.length} shown of ${events().length} seen`);
    };
    kind.addEventListener("change", draw);
    fn.addEventListener("input", draw);
    const filters = h(
      "div",
      { class: "filters" },
      h("label", { for: "ev-kind" }, "Kind"),
      kind,
      h("label", { for: "ev-function" }, "Function"),
      fn,
      count,
    );
    const head = ["time", "kind", "function", "source", "data"].map((c) => h("th", { scope: "col" }, c));
    const tbl = h("div", { class: "scroll-x" }, h("table", { id: "events-table" }, h("thead", {}, h("tr", {}, head)), body));
    clear(root, h("h2", {}, "Events"), filters, tbl);
    draw();
    const stop = onEvent(draw);
    return { unmount: stop };
  },
};
