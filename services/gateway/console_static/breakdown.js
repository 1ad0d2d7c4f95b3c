// Breakdown: where recent invocations spent their time (queue, transfer, load, compute),
// one stacked bar each, from the invocation.completed events; an SVG drawn by hand.
import { clear, clock, h, ms, num, s, table } from "./dom.js";
import { completed, onEvent } from "./store.js";

const SHOWN = 30;
const STAGES = ["queue", "transfer", "load", "compute"];
const ROW = 18;
const LABEL = 230;
const WIDTH = 1000;

function chart(runs) {
  const max = Math.max(1, ...runs.map((e) => e.data.breakdown.total_us));
  const scale = (WIDTH - LABEL - 90) / max;
  const bars = runs.map((e, i) => {
    const b = e.data.breakdown;
    let x = LABEL;
    const y = i * ROW;
    const parts = STAGES.map((st) => {
      const w = Math.max(0, (b[`${st}_us`] || 0) * scale);
      const rect = s("rect", { class: `st-${st}`, x, y: y + 2, width: w, height: ROW - 4 }, s("title", {}, `${st}: ${ms(b[`${st}_us`])}`));
      x += w;
      return rect;
    });
    const name = `${clock(e.time)} ${e.data.function}${b.cold ? " (cold)" : ""}`;
    return s(
      "g",
      { class: "bar" },
      s("text", { x: LABEL - 6, y: y + ROW - 5, "text-anchor": "end" }, name.length > 32 ? `${name.slice(0, 31)}…` : name),
      parts,
      s("text", { x: x + 4, y: y + ROW - 5 }, ms(b.total_us)),
    );
  });
  const height = Math.max(ROW, runs.length * ROW);
  return s(
    "svg",
    { id: "breakdown-chart", viewBox: `0 0 ${WIDTH} ${height}`, width: "100%", role: "img", "aria-label": `Time breakdown of the last ${runs.length} invocations` },
    bars,
  );
}

function legend() {
  return h("ul", { class: "legend" }, STAGES.map((st) => h("li", {}, h("span", { class: `swatch st-${st}` }), st)));
}

function totals(runs) {
  const rows = STAGES.map((st) => {
    const sum = runs.reduce((a, e) => a + (e.data.breakdown[`${st}_us`] || 0), 0);
    return [st, num(ms(runs.length ? sum / runs.length : null))];
  });
  return table("Mean per invocation", ["stage", "time"], rows, { class: "narrow" });
}

export default {
  title: "Breakdown",
  mount(root) {
    const body = h("div", {});
    clear(root, h("h2", {}, "Breakdown of recent invocations"), legend(), body);
    const draw = () => {
      const runs = completed().slice(-SHOWN).reverse();
      clear(body, runs.length ? [chart(runs), totals(runs)] : h("p", { class: "muted" }, "No invocation seen yet: invoke a function (the playground on Functions)."));
    };
    draw();
    const stop = onEvent((e) => {
      if (e.kind === "invocation.completed") draw();
    });
    return { unmount: stop };
  },
};
