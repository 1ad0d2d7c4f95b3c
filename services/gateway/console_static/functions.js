// Functions: the caller's functions (GET /v1/functions: each with the configuration its
// profile chose and its requests queued and running), what this console has seen of their
// invocations (events), and a playground that invokes one whose input is text (BYTES)
// through the Open Inference Protocol (POST /v2/models/{name}/infer).
import { api } from "./api.js";
import { bytes, clear, clock, h, ms, num, quantile, table } from "./dom.js";
import { completed } from "./store.js";

const SHOWN_VALUES = 8;

function signature(specs) {
  return specs.map((t) => `${t.name} ${t.datatype} [${t.shape.join(", ")}]`).join(", ");
}

function source(model) {
  const from = model.builtin ? `builtin ${model.builtin}` : model.upload ? `upload ${model.upload.slice(0, 12)}…` : model.path;
  return `${model.architecture} (${from})`;
}

// The configuration DTS chose from the function's profile (batch × concurrency), with
// why as a tooltip; "so far" while the background profile has measured batch 1 only.
// Where a function's instances are: "node/gpu:N" each (the node alone without a GPU).
function placedOn(f) {
  const gpus = f.gpus || {};
  return f.nodes.flatMap((n) => (gpus[n] ? gpus[n].map((g) => `${n}/${g}`) : [n]));
}

function profileCell(p) {
  if (!p) return h("span", { class: "muted" }, "not yet");
  return h("span", { title: p.reason, class: "profile" }, `batch ${p.batch} × ${p.concurrency}${p.complete ? "" : " (so far)"}`);
}

// Requests queued and running, over the scheduler replicas' latest reports.
function loadCell(load) {
  if (!load?.replicas) return h("span", { class: "muted" }, "no report");
  return num(`${load.queued} / ${load.in_flight}`);
}

// Invocations seen per function (tenant/name): count, p50, p99 of the total, cold starts.
function seenStats() {
  const by = new Map();
  for (const e of completed()) {
    const key = `${e.data.tenant}/${e.data.function}`;
    if (!by.has(key)) by.set(key, []);
    by.get(key).push(e.data.breakdown);
  }
  return by;
}

function functionsTable(functions) {
  const seen = seenStats();
  const rows = functions.map((f) => {
    const key = `${f.spec.tenant}/${f.spec.name}`;
    const runs = seen.get(key) || [];
    const totals = runs.map((b) => b.total_us);
    return [
      [h("span", { class: "fn-name" }, f.spec.name), h("div", { class: "muted" }, f.spec.tenant)],
      h("span", { class: `status status-${f.status}` }, f.status),
      source(f.spec.model),
      `${signature(f.inputs)} → ${signature(f.outputs)}`,
      f.nodes.length ? placedOn(f).join(", ") : h("span", { class: "muted" }, "none (scaled to zero)"),
      num(bytes(f.model_bytes)),
      f.spec.options.max_batch_size,
      profileCell(f.profile),
      loadCell(f.load),
      runs.length,
      num(ms(quantile(totals, 0.5))),
      num(ms(quantile(totals, 0.99))),
      runs.filter((b) => b.cold).length,
    ];
  });
  const head = ["name, tenant", "status", "model", "inputs → outputs", "instances on", "weights", "max batch", "profile (DTS)", "queued / running", "seen", "p50", "p99", "cold"];
  return table(null, head, rows, { id: "functions-table" });
}

export function outputView(out) {
  const values = Array.isArray(out.data) ? out.data.slice(0, SHOWN_VALUES) : [];
  const shown = values.map((v) => (typeof v === "number" ? v.toFixed(4) : String(v))).join(", ");
  return h(
    "div",
    { class: "output" },
    h("div", {}, h("strong", {}, out.name), ` ${out.datatype} `, h("span", { class: "shape" }, `[${out.shape.join(", ")}]`)),
    h("div", { class: "values" }, `${shown}${out.data && out.data.length > SHOWN_VALUES ? ", …" : ""}`),
  );
}

function resultView(res, wallMs) {
  const p = res.parameters || {};
  const b = p.breakdown_us || {};
  const rows = ["queue", "transfer", "load", "compute", "total"].map((k) => [k, num(ms(b[k]))]);
  return [
    h("p", {}, `on ${p.node ?? "?"} / ${p.device ?? "?"}, batch ${p.batch ?? 1}; ${wallMs.toFixed(1)} ms in the browser`),
    res.outputs.map(outputView),
    table("Breakdown (breakdown_us)", ["stage", "time"], rows, { id: "playground-breakdown", class: "narrow" }),
  ];
}

function playground(state) {
  const select = h("select", { id: "pg-function", "aria-label": "Function" });
  const text = h("textarea", { id: "pg-text", rows: 3, "aria-label": "Input text, one row per line" }, "hello world");
  const result = h("div", { id: "pg-result", role: "status", "aria-live": "polite" });
  const run = async (ev) => {
    ev.preventDefault();
    const fn = state.functions.find((f) => f.spec.name === select.value);
    if (!fn) return;
    const lines = text.value.split("\n").filter((l) => l.trim() !== "");
    const input = fn.inputs[0];
    const body = { inputs: [{ name: input.name, datatype: "BYTES", shape: [lines.length], data: lines }] };
    clear(result, h("p", { class: "muted" }, "Invoking…"));
    const t0 = performance.now();
    try {
      const res = await api(`/v2/models/${encodeURIComponent(fn.spec.name)}/infer`, body);
      clear(result, resultView(res, performance.now() - t0));
    } catch (err) {
      clear(result, h("p", { class: "error" }, `${err.status ?? ""} ${err.message}${err.field ? ` (field ${err.field})` : ""}`));
    }
  };
  const form = h(
    "form",
    { class: "playground", onsubmit: run },
    h("label", { for: "pg-function" }, "Function"),
    select,
    h("label", { for: "pg-text" }, "Text (one row per line)"),
    text,
    h("button", { type: "submit", id: "pg-invoke" }, "Invoke"),
  );
  // Refill the choices without losing the one made (a refresh must not reset the form).
  const update = () => {
    const names = state.functions.filter((f) => f.inputs.length === 1 && f.inputs[0].datatype === "BYTES").map((f) => f.spec.name);
    const chosen = select.value;
    if (names.join("\n") !== [...select.options].map((o) => o.value).join("\n")) {
      clear(select, names.map((n) => h("option", { value: n }, n)));
      if (names.includes(chosen)) select.value = chosen;
    }
  };
  return { node: h("section", { "aria-labelledby": "pg-title" }, h("h3", { id: "pg-title" }, "Playground"), form, result), update };
}

export default {
  title: "Functions",
  mount(root) {
    const state = { functions: [] };
    const list = h("div", { id: "functions" }, h("p", { class: "muted" }, "Loading…"));
    const updated = h("p", { class: "muted" });
    const pg = playground(state);
    clear(root, h("h2", {}, "Functions"), list, updated, pg.node);
    return {
      async refresh() {
        state.functions = (await api("/v1/functions")).functions;
        clear(list, state.functions.length ? functionsTable(state.functions) : h("p", {}, "No functions deployed."));
        clear(updated, `p50, p99 and cold starts: of the invocations this console has seen. Updated ${clock(Date.now() / 1000)}.`);
        pg.update();
      },
    };
  },
};
