// Topology: each node's devices and links (GET /v1/nodes: `links`, from its transfer
// service) drawn as a graph, the host in the middle and the GPUs round it; a link's width
// is its bandwidth, its label the bytes it has carried (both ways) since the node started.
import { api } from "./api.js";
import { bytes, clear, h, num, s, table } from "./dom.js";

const W = 640;
const HEIGHT = 400;
const R = 150; // the GPUs' circle
const BOX = { w: 124, h: 40 };
const HOST = { w: 76, h: 34 };

const family = (kind) => (kind.startsWith("nvlink") || kind.startsWith("nvswitch") ? "nvlink" : "pcie");
const moved = (ln) => ln.bytes_a_to_b + ln.bytes_b_to_a;

function positions(devices) {
  const gpus = devices.filter((d) => d.kind !== "host");
  const at = new Map([["host", { x: W / 2, y: HEIGHT / 2 }]]);
  gpus.forEach((d, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / gpus.length;
    at.set(d.name, { x: W / 2 + R * 1.45 * Math.cos(angle), y: HEIGHT / 2 + R * Math.sin(angle) });
  });
  return at;
}

// A link's path: straight, or bent aside when it would cross the host's box in the middle.
function path(a, b) {
  const [mx, my] = [(a.x + b.x) / 2, (a.y + b.y) / 2];
  const [dx, dy] = [b.x - a.x, b.y - a.y];
  const len = Math.hypot(dx, dy) || 1;
  const fromCentre = Math.abs((W / 2 - a.x) * dy - (HEIGHT / 2 - a.y) * dx) / len;
  const crossesHost = fromCentre < HOST.w && Math.hypot(mx - W / 2, my - HEIGHT / 2) < len / 2;
  if (!crossesHost) return { d: `M${a.x},${a.y} L${b.x},${b.y}`, label: { x: mx, y: my } };
  const bend = 0.9 * HOST.w;
  const [cx, cy] = [mx - (dy / len) * bend * 2, my + (dx / len) * bend * 2];
  return { d: `M${a.x},${a.y} Q${cx},${cy} ${b.x},${b.y}`, label: { x: (mx + cx) / 2, y: (my + cy) / 2 } };
}

function graph(node) {
  const at = positions(node.devices);
  const edges = node.links.links.map((ln) => {
    const [a, b] = [at.get(ln.a), at.get(ln.b)];
    if (!a || !b) return null;
    const p = path(a, b);
    const total = moved(ln);
    const title = `${ln.a} ↔ ${ln.b}: ${ln.kind}, ${ln.gbps} GB/s each way; carried ${bytes(ln.bytes_a_to_b)} ${ln.a}→${ln.b}, ${bytes(ln.bytes_b_to_a)} ${ln.b}→${ln.a}`;
    return s(
      "g",
      { class: `topo-link topo-${family(ln.kind)}${total ? " topo-busy" : ""}`, "data-link": `${ln.a}-${ln.b}` },
      s("path", { d: p.d, "stroke-width": Math.min(8, 1.5 + ln.gbps / 12) }, s("title", {}, title)),
      total ? s("text", { x: p.label.x, y: p.label.y - 4, "text-anchor": "middle", class: "topo-bytes" }, bytes(total)) : null,
    );
  });
  const boxes = node.devices.map((d) => {
    const c = at.get(d.name);
    if (!c) return null;
    const box = d.kind === "host" ? HOST : BOX;
    const note = d.kind === "host" ? "" : `${bytes(d.used_bytes)} / ${bytes(d.memory_bytes)}`;
    return s(
      "g",
      { class: `topo-device topo-${d.kind === "host" ? "host" : "gpu"}`, "data-device": d.name },
      s("rect", { x: c.x - box.w / 2, y: c.y - box.h / 2, width: box.w, height: box.h, rx: 6 }),
      s("text", { x: c.x, y: c.y + (note ? -3 : 5), "text-anchor": "middle", class: "topo-name" }, d.name),
      note ? s("text", { x: c.x, y: c.y + 13, "text-anchor": "middle", class: "topo-note" }, note) : null,
      s("title", {}, `${d.name}: ${d.model}${note ? `, ${note} used` : ""}${d.functions ? `; instances: ${d.functions.join(", ")}` : ""}`),
    );
  });
  return s(
    "svg",
    { class: "topo", viewBox: `0 0 ${W} ${HEIGHT}`, width: W, role: "img", "aria-label": `Links of ${node.node}: ${node.links.links.length}` },
    edges,
    boxes,
  );
}

function linksTable(node) {
  const rows = node.links.links.map((ln) => [
    h("span", { class: "nowrap" }, `${ln.a} ↔ ${ln.b}`),
    ln.kind,
    ln.gbps,
    num(bytes(ln.bytes_a_to_b)),
    num(bytes(ln.bytes_b_to_a)),
  ]);
  return table("Links and bytes carried", ["link a ↔ b", "kind", "GB/s each way", "a → b", "b → a"], rows, { class: "narrow topo-table" });
}

function nodeSection(node) {
  const links = node.links;
  let body;
  if (!links) body = h("p", { class: "muted" }, "The node's transfer service did not answer.");
  else if (!links.links.length) body = h("p", { class: "muted" }, "No GPUs on this node: no links.");
  else
    body = [
      h("p", { class: "muted" }, `Topology ${links.topology}${links.simulated ? " (simulated GPUs: bytes of emulated copies)" : ""}.`),
      h("div", { class: "topo-row" }, h("div", { class: "topo-box" }, graph(node)), linksTable(node)),
    ];
  return h("section", { class: "node", "aria-labelledby": `topo-${node.node}` }, h("h3", { id: `topo-${node.node}` }, node.node), body);
}

function legend() {
  return h(
    "ul",
    { class: "legend" },
    h("li", {}, h("span", { class: "swatch topo-swatch-pcie" }), "PCIe (host ↔ GPU)"),
    h("li", {}, h("span", { class: "swatch topo-swatch-nvlink" }), "NVLink (GPU ↔ GPU)"),
    h("li", { class: "muted" }, "width: bandwidth; label: bytes carried"),
  );
}

export default {
  title: "Topology",
  mount(root) {
    const body = h("div", { id: "topology" }, h("p", { class: "muted" }, "Loading…"));
    clear(root, h("h2", {}, "Topology and transfers"), legend(), body);
    return {
      async refresh() {
        const { nodes } = await api("/v1/nodes");
        clear(body, nodes.length ? nodes.map(nodeSection) : h("p", {}, "No live nodes."));
      },
    };
  },
};
