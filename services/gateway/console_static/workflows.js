// Workflows: the caller's workflows (GET /v1/workflows) drawn as DAGs, and a playground
// that invokes one whose inputs are text (BYTES) through POST /v1/workflows/{name}/infer;
// a run's per-step times and devices are then drawn on its DAG.
import { api } from "./api.js";
import { drawDag, layout } from "./dag.js";
import { clear, h, ms, num, table } from "./dom.js";
import { outputView } from "./functions.js";

function stepsTable(record) {
  const rows = record.order.map((name) => {
    const st = record.spec.steps.find((x) => x.name === name);
    const reads = Object.entries(st.inputs).map(([input, ref]) => `${input} ← ${ref}`);
    return [h("span", { class: "fn-name" }, name), st.function, reads.join(", ")];
  });
  return table(null, ["step (run order)", "function", "reads"], rows, { class: "narrow" });
}

function workflowSection(record, ran) {
  const spec = record.spec;
  const sig = (ts) => ts.map((t) => `${t.name} ${t.datatype} [${t.shape.join(", ")}]`).join(", ");
  return h(
    "section",
    { class: "workflow", "aria-labelledby": `wf-${spec.name}`, "data-workflow": spec.name },
    h("h3", { id: `wf-${spec.name}` }, spec.name),
    h(
      "p",
      { class: "muted" },
      `${spec.steps.length} step${spec.steps.length === 1 ? "" : "s"} · ${sig(record.inputs)} → ${sig(record.outputs)}`,
      spec.slo_ms ? ` · SLO ${spec.slo_ms} ms` : "",
    ),
    h("div", { class: "dag-box" }, drawDag(spec.name, layout(record), ran)),
    stepsTable(record),
  );
}

function resultView(res, wallMs) {
  const p = res.parameters || {};
  const rows = (p.steps || []).map((st) => [
    st.step,
    st.function,
    `${st.node}/${st.device}`,
    ...["queue", "transfer", "load", "compute", "total"].map((k) => num(ms(st.breakdown[`${k}_us`]))),
  ]);
  return [
    h("p", {}, `workflow total ${ms(p.total_us)}; ${wallMs.toFixed(1)} ms in the browser`),
    res.outputs.map(outputView),
    table("Steps", ["step", "function", "on", "queue", "transfer", "load", "compute", "total"], rows, { id: "wf-steps" }),
  ];
}

function playground(state, onRun) {
  const select = h("select", { id: "wf-function", "aria-label": "Workflow" });
  const fields = h("div", { class: "wf-inputs" });
  const result = h("div", { id: "wf-result", role: "status", "aria-live": "polite" });
  const chosen = () => state.workflows.find((w) => w.spec.name === select.value);
  const drawFields = () => {
    const wf = chosen();
    if (!wf) return clear(fields);
    if (!wf.inputs.every((t) => t.datatype === "BYTES"))
      return clear(fields, h("p", { class: "muted" }, "The playground sends text (BYTES) inputs only."));
    clear(
      fields,
      wf.inputs.map((t) => [
        h("label", { for: `wf-in-${t.name}` }, `${t.name} (one row per line)`),
        h("textarea", { id: `wf-in-${t.name}`, "data-input": t.name, rows: 2 }, "hello world"),
      ]),
    );
  };
  const run = async (ev) => {
    ev.preventDefault();
    const wf = chosen();
    if (!wf) return;
    const inputs = [...fields.querySelectorAll("textarea")].map((t) => {
      const lines = t.value.split("\n").filter((l) => l.trim() !== "");
      return { name: t.dataset.input, datatype: "BYTES", shape: [lines.length], data: lines };
    });
    clear(result, h("p", { class: "muted" }, "Invoking…"));
    const t0 = performance.now();
    try {
      const res = await api(`/v1/workflows/${encodeURIComponent(wf.spec.name)}/infer`, { inputs });
      clear(result, resultView(res, performance.now() - t0));
      onRun(wf.spec.name, res.parameters?.steps || []);
    } catch (err) {
      clear(result, h("p", { class: "error" }, `${err.status ?? ""} ${err.message}${err.field ? ` (field ${err.field})` : ""}`));
    }
  };
  select.addEventListener("change", drawFields);
  const form = h(
    "form",
    { class: "playground", onsubmit: run },
    h("label", { for: "wf-function" }, "Workflow"),
    select,
    fields,
    h("button", { type: "submit", id: "wf-invoke" }, "Invoke"),
  );
  // Refill the choices without losing the one made (a refresh must not reset the form).
  const update = () => {
    const names = state.workflows.map((w) => w.spec.name);
    const before = select.value;
    if (names.join("\n") !== [...select.options].map((o) => o.value).join("\n")) {
      clear(select, names.map((n) => h("option", { value: n }, n)));
      if (names.includes(before)) select.value = before;
      drawFields();
    }
  };
  return { node: h("section", { "aria-labelledby": "wf-pg-title" }, h("h3", { id: "wf-pg-title" }, "Playground"), form, result), update };
}

export default {
  title: "Workflows",
  mount(root) {
    const state = { workflows: [] };
    const ran = new Map(); // workflow -> Map(step -> its report in the last run)
    const list = h("div", { id: "workflows" }, h("p", { class: "muted" }, "Loading…"));
    let drawn = null; // what the list was drawn from: redrawn only when it changes
    const draw = () => {
      clear(
        list,
        state.workflows.length
          ? state.workflows.map((w) => workflowSection(w, ran.get(w.spec.name)))
          : h("p", {}, "No workflows deployed (POST /v1/workflows: a DAG of deployed functions)."),
      );
    };
    const pg = playground(state, (name, steps) => {
      ran.set(name, new Map(steps.map((st) => [st.step, st])));
      draw();
    });
    clear(root, h("h2", {}, "Workflows"), list, pg.node);
    return {
      async refresh() {
        const { workflows } = await api("/v1/workflows");
        const text = JSON.stringify(workflows);
        state.workflows = workflows;
        if (text !== drawn) {
          drawn = text;
          draw();
        }
        pg.update();
      },
    };
  },
};
