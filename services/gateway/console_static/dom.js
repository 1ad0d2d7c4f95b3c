// DOM helpers: elements built by hand (no framework, no innerHTML: nothing the API
// returns is ever parsed as markup) and number formatting.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// h("td", {class: "num"}, "12"): an HTML element with attributes and children.
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

// An SVG element (charts are drawn with these).
export function s(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

// A table from a header row and rows of cells (numbers right-aligned).
export function table(caption, head, rows, attrs) {
  const cell = (tag, v) =>
    h(tag, { class: typeof v === "number" || v?.num ? "num" : null }, v?.num ?? v);
  return h(
    "div",
    { class: "scroll-x" },
    h(
      "table",
      attrs,
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => cell("td", c))))),
    ),
  );
}

// A right-aligned cell holding text (a formatted number).
export const num = (text) => ({ num: text });

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${UNITS[i]}`;
}

export function ms(us) {
  if (us === null || us === undefined) return "–";
  return `${(Number(us) / 1000).toFixed(us < 10000 ? 2 : 1)} ms`;
}

export function pct(x) {
  return `${(Number(x) * 100).toFixed(1)} %`;
}

export function clock(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

// The q-quantile (0..1) of numbers, nearest rank.
export function quantile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

export function clear(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  return el;
}
