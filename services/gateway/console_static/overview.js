// Overview: every live node, its services, devices, memory pools and tensor store
// (GET /v1/nodes; a tenant's key sees only its own reservations).
import { api } from "./api.js";
import { bytes, clear, h, num, pct, table } from "./dom.js";

function summary(nodes) {
  const devices = nodes.flatMap((n) => n.devices.filter((d) => d.kind !== "host"));
  const total = devices.reduce((a, d) => a + d.memory_bytes, 0);
  const used = devices.reduce((a, d) => a + d.used_bytes, 0);
  const tiers = nodes.flatMap((n) => Object.values(n.tensor_store || {}));
  const stored = tiers.reduce((a, t) => a + t.bytes_stored, 0);
  const alone = tiers.reduce((a, t) => a + t.bytes_without_sharing, 0);
  const card = (label, value, note) =>
    h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), note ? h("div", { class: "note" }, note) : null);
  return h(
    "div",
    { class: "cards" },
    card("Nodes", nodes.length),
    card("Devices", devices.length, [...new Set(devices.map((d) => d.model))].join(", ")),
    card("Device memory used", `${bytes(used)} / ${bytes(total)}`),
    card("Tensor store", bytes(stored), `private copies would take ${bytes(alone)}`),
  );
}

function devicesTable(node) {
  const rows = node.devices.map((d) => [
    d.name,
    d.kind,
    d.model,
    num(bytes(d.used_bytes)),
    num(bytes(d.memory_bytes)),
    h("meter", { min: 0, max: d.memory_bytes || 1, value: d.used_bytes, title: pct(d.used_bytes / (d.memory_bytes || 1)) }),
  ]);
  return table("Devices", ["device", "kind", "model", "used", "memory", "use"], rows);
}

function poolsTable(node) {
  const pools = node.memory?.pools;
  if (!pools) return h("p", { class: "muted" }, "The node's memory service did not answer.");
  const rows = Object.entries(pools).map(([dev, p]) => [
    dev,
    num(bytes(p.capacity_bytes)),
    num(bytes(p.reserved_bytes)),
    num(bytes(p.allocated_bytes)),
    num(bytes(p.free_bytes)),
    num(bytes(p.largest_free_block_bytes)),
    num(pct(p.fragmentation)),
    p.segments,
    p.allocations,
    num(bytes(p.held_bytes)),
  ]);
  const head = ["pool", "capacity", "reserved", "allocated", "free", "largest free", "fragmentation", "segments", "allocations", "held"];
  const reserved = Object.entries(node.memory.reserved || {});
  return [
    table("Memory pools", head, rows),
    reserved.length
      ? table("Reservations", ["device and function", "bytes"], reserved.map(([k, v]) => [k, num(bytes(v))]))
      : null,
  ];
}

function storeTable(node) {
  const tiers = node.tensor_store;
  if (!tiers) return h("p", { class: "muted" }, "The node's tensor store did not answer.");
  const rows = Object.entries(tiers).map(([tier, t]) => [
    tier,
    t.tensors,
    t.leases,
    num(bytes(t.bytes_stored)),
    num(bytes(t.bytes_without_sharing)),
    num(bytes(t.bytes_without_sharing - t.bytes_stored)),
  ]);
  const head = ["tier", "tensors", "leases", "stored", "as private copies", "saved by sharing"];
  return table("Tensor store", head, rows);
}

function nodeSection(node) {
  const now = Date.now() / 1000;
  const services = Object.entries(node.services).map(
    ([name, s]) => `${name} (pid ${s.pid}, seen ${Math.max(0, Math.round(now - s.updated_at))} s ago)`,
  );
  return h(
    "section",
    { class: "node", "aria-labelledby": `node-${node.node}` },
    h("h3", { id: `node-${node.node}` }, node.node),
    h("p", { class: "muted" }, services.join(" · ")),
    devicesTable(node),
    poolsTable(node),
    storeTable(node),
  );
}

export default {
  title: "Overview",
  mount(root) {
    const body = h("div", { id: "overview" }, h("p", { class: "muted" }, "Loading…"));
    clear(root, h("h2", {}, "Overview"), body);
    return {
      async refresh() {
        const { nodes } = await api("/v1/nodes");
        clear(
          body,
          summary(nodes),
          nodes.length ? nodes.map(nodeSection) : h("p", {}, "No live nodes."),
        );
      },
    };
  },
};
