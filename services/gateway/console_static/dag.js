// A workflow drawn as a DAG (hand-made SVG): its inputs in the first column, each step one
// column right of its furthest producer (in the record's run order within a column), its
// outputs in the last; an edge from each producer (a workflow input or a step) to each
// step or output that reads it.
import { ms, s } from "./dom.js";

const BOX_W = 180;
const BOX_H = 46;
const COL_GAP = 64;
const ROW_GAP = 16;
const PAD = 8;

// The producer a reference names: "$input.text" -> "in:text", "embed.embedding" -> "step:embed".
function source(ref) {
  const [head, ...rest] = ref.split(".");
  return head === "$input" ? `in:${rest.join(".")}` : `step:${head}`;
}

// Nodes with their column and row, and edges, from a workflow record (GET /v1/workflows).
export function layout(record) {
  const steps = new Map(record.spec.steps.map((st) => [st.name, st]));
  const col = new Map();
  const nodes = [];
  const edges = [];
  for (const t of record.inputs) {
    col.set(`in:${t.name}`, 0);
    nodes.push({ id: `in:${t.name}`, kind: "input", label: t.name, sub: `${t.datatype} [${t.shape.join(", ")}]` });
  }
  for (const name of record.order) {
    const st = steps.get(name);
    const from = Object.entries(st.inputs).map(([input, ref]) => ({ from: source(ref), input, ref }));
    col.set(`step:${name}`, 1 + Math.max(0, ...from.map((e) => col.get(e.from) ?? 0)));
    nodes.push({ id: `step:${name}`, kind: "step", label: name, sub: st.function });
    for (const e of from) edges.push({ from: e.from, to: `step:${name}`, label: `${e.ref} → ${e.input}` });
  }
  const last = 1 + Math.max(0, ...[...col.values()]);
  for (const [out, ref] of Object.entries(record.spec.outputs || {})) {
    col.set(`out:${out}`, last);
    nodes.push({ id: `out:${out}`, kind: "output", label: out, sub: ref });
    edges.push({ from: source(ref), to: `out:${out}`, label: ref });
  }
  const rows = new Map();
  for (const n of nodes) {
    n.col = col.get(n.id);
    n.row = rows.get(n.col) ?? 0;
    rows.set(n.col, n.row + 1);
  }
  return { nodes, edges, cols: last + 1, rows: Math.max(1, ...rows.values()) };
}

const clip = (text, n) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);

// The SVG of a layout; `ran` (step name -> its report from the last run) adds each
// step's time and device.
export function drawDag(name, dag, ran) {
  const x = (n) => PAD + n.col * (BOX_W + COL_GAP);
  const y = (n) => PAD + n.row * (BOX_H + ROW_GAP);
  const byId = new Map(dag.nodes.map((n) => [n.id, n]));
  const marker = `dag-arrow-${name}`; // one per drawing: ids are unique in the page
  const width = 2 * PAD + dag.cols * BOX_W + (dag.cols - 1) * COL_GAP;
  const height = 2 * PAD + dag.rows * BOX_H + (dag.rows - 1) * ROW_GAP;
  const edges = dag.edges.map((e) => {
    const a = byId.get(e.from);
    const b = byId.get(e.to);
    if (!a || !b) return null;
    const [x1, y1, x2, y2] = [x(a) + BOX_W, y(a) + BOX_H / 2, x(b), y(b) + BOX_H / 2];
    const mid = (x1 + x2) / 2;
    return s(
      "path",
      { class: "dag-edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2 - 4},${y2}`, "marker-end": `url(#${marker})`, "data-from": e.from, "data-to": e.to },
      s("title", {}, e.label),
    );
  });
  const boxes = dag.nodes.map((n) => {
    const step = n.kind === "step" ? ran?.get(n.label) : null;
    const sub = step ? `${ms(step.breakdown.total_us)} on ${step.node}/${step.device}` : n.sub;
    return s(
      "g",
      { class: `dag-node dag-${n.kind}`, "data-id": n.id },
      s("rect", { x: x(n), y: y(n), width: BOX_W, height: BOX_H, rx: n.kind === "step" ? 6 : 16 }),
      s("text", { x: x(n) + 10, y: y(n) + 19, class: "dag-label" }, clip(n.label, 24)),
      s("text", { x: x(n) + 10, y: y(n) + 36, class: "dag-sub" }, clip(sub, 28)),
      s("title", {}, `${n.kind} ${n.label}: ${sub}`),
    );
  });
  const arrow = s(
    "marker",
    { id: marker, viewBox: "0 0 8 8", refX: 4, refY: 4, markerWidth: 8, markerHeight: 8, orient: "auto" },
    s("path", { d: "M0,0 L8,4 L0,8 z", class: "dag-arrowhead" }),
  );
  return s(
    "svg",
    { class: "dag", viewBox: `0 0 ${width} ${height}`, width, role: "img", "aria-label": `Workflow ${name}: ${dag.nodes.filter((n) => n.kind === "step").length} steps` },
    s("defs", {}, arrow),
    edges,
    boxes,
  );
}
