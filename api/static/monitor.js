// swarm-peer health page: polls api/v1/state and re-renders (see api/monitor.py for the JSON).
// Every string in the JSON comes from records that untrusted peers write: it only ever enters the page as text
// (textContent, setAttribute), never as markup, and a state is a CSS class only if it is one of STATES.
"use strict";

const STATES = ["joining", "online", "busy", "unreachable", "offline"];
const MIN_POLL_MS = 1000;
const MAX_POLL_MS = 60000;
const FETCH_TIMEOUT_MS = 10000;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function stateClass(state) {
  return STATES.includes(state) ? state : "unknown";
}

function shortId(peerId) {
  const id = String(peerId);
  return id.length <= 14 ? id : id.slice(0, 6) + "…" + id.slice(-6);
}

function num(value, digits) {
  return typeof value === "number" && isFinite(value)
    ? value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 })
    : "—";
}

function mib(value) {
  if (typeof value !== "number" || !isFinite(value)) return "—";
  return value >= 1024 ? num(value / 1024, 1) + " GiB" : num(value, 0) + " MiB";
}

// one cell per block of [0, numBlocks); cells in [start, end) get the class `filled`
function bar(numBlocks, cellClass, title) {
  const row = el("div", "bar");
  for (let block = 0; block < numBlocks; block++) {
    const cell = el("span", "cell " + cellClass(block));
    cell.title = title(block);
    row.append(cell);
  }
  return row;
}

function peerRow(model, peer) {
  const state = stateClass(peer.state);
  const tr = el("tr", "peer " + state);
  tr.setAttribute("data-peer-id", String(peer.peer_id));
  tr.setAttribute("data-state", state);
  const id = el("td", "peer-id mono", shortId(peer.peer_id));
  id.title = String(peer.peer_id);
  const span = peer.start_block + ":" + peer.end_block;
  const blocks = el("td");
  blocks.append(
    bar(
      model.num_blocks,
      (b) => (b >= peer.start_block && b < peer.end_block ? state : "empty"),
      (b) => "block " + b + (b >= peer.start_block && b < peer.end_block ? ": " + state : ""),
    ),
  );
  const adapters = Array.isArray(peer.adapters) && peer.adapters.length ? peer.adapters.join(", ") : "—";
  const cache = num(peer.cache_tokens_left, 0) + " tok · " + mib(peer.cache_mb_left);
  let throughput = peer.throughput > 0 ? num(peer.throughput, 0) : "—"; // 0: not measured
  if (peer.training_step !== null && peer.training_step !== undefined) {
    throughput += " · step " + num(peer.training_step, 0) + " · " + num(peer.samples_per_second, 1) + " samples/s";
  }
  const name = el("td", "name", peer.public_name || "—");
  name.title = peer.public_name || "";
  tr.append(
    id,
    name,
    el("td", "state " + state, state),
    el("td", "mono", span),
    blocks,
    el("td", "mono", peer.version),
    el("td", "mono", peer.dtype),
    el("td", "num", throughput),
    el("td", "adapters", adapters),
    el("td", "num", cache),
    el("td", "link", peer.connection || "—"),
    el("td", "num", peer.rtt_ms === null || peer.rtt_ms === undefined ? "—" : num(peer.rtt_ms, 1) + " ms"),
  );
  return tr;
}

function modelSection(model) {
  const section = el("section", "model " + (model.healthy ? "healthy" : "unhealthy"));
  section.setAttribute("data-model-id", String(model.model_id));
  section.setAttribute("data-healthy", model.healthy ? "true" : "false");

  const h2 = el("h2");
  h2.append(
    el("span", "badge " + (model.healthy ? "healthy" : "unhealthy"), model.healthy ? "healthy" : "unhealthy"),
    " ",
    el("span", "model-name", model.name || "(unnamed)"),
    " ",
    el("code", "model-id", model.model_id),
  );
  section.append(h2);

  const uncovered = (model.uncovered || []).map((r) => r[0] + ":" + r[1]).join(", ");
  const facts = model.num_blocks + " blocks · " + model.peers.length + " peers";
  section.append(el("p", "facts muted", uncovered ? facts + " · uncovered: " + uncovered : facts));

  const table = el("table");
  const head = el("tr");
  for (const name of ["peer", "name", "state", "span", "blocks", "version", "dtype", "tok/s", "adapters",
                      "KV cache free", "link", "RTT"]) {
    head.append(el("th", null, name));
  }
  const thead = el("thead");
  thead.append(head);
  table.append(thead);
  const body = el("tbody");
  const coverage = el("tr", "coverage");
  const label = el("td", null, "online peers per block");
  label.colSpan = 4;
  const cells = el("td");
  cells.append(
    bar(
      model.num_blocks,
      (b) => (model.online[b] > 0 ? "covered" : "uncovered"),
      (b) => "block " + b + ": " + model.online[b] + " online",
    ),
  );
  coverage.append(label, cells, el("td"));
  coverage.lastChild.colSpan = 7;
  body.append(coverage);
  for (const peer of model.peers) body.append(peerRow(model, peer));
  table.append(body);
  section.append(table);
  return section;
}

function render(state) {
  const models = Array.isArray(state.models) ? state.models : [];
  const main = document.getElementById("models");
  main.replaceChildren(...models.map(modelSection));
  const healthy = models.filter((m) => m.healthy).length;
  const peers = new Set(models.flatMap((m) => m.peers.map((p) => p.peer_id))).size;
  const summary = document.getElementById("summary");
  if (state.updated === null || state.updated === undefined) {
    summary.textContent = "Waiting for the first look at the swarm…";
  } else {
    summary.textContent =
      models.length + " models (" + healthy + " healthy) · " + peers + " peers · updated " +
      new Date(state.updated * 1000).toLocaleTimeString();
  }
  document.body.setAttribute("data-updated", String(state.updated));
  const error = document.getElementById("error");
  error.hidden = !state.error;
  error.textContent = state.error ? "Last refresh failed: " + state.error : "";
  document.getElementById("refresh").textContent = String(state.refresh);
}

async function poll() {
  let delay = 5000;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch("api/v1/state", { cache: "no-store", signal: controller.signal });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const state = await response.json();
    render(state);
    delay = Math.min(MAX_POLL_MS, Math.max(MIN_POLL_MS, Number(state.refresh) * 1000 || delay));
  } catch (e) {
    const error = document.getElementById("error");
    error.hidden = false;
    error.textContent = "The monitor does not answer: " + e;
  } finally {
    clearTimeout(timer);
    setTimeout(poll, delay);
  }
}

poll();
