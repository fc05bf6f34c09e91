// edgetally's built-in dashboard: plain JavaScript over the node's own HTTP API, charts by
// uPlot (bundled). Every string from the node is inserted as text, never as markup:
// category and entity names come from producers.
"use strict";

const REFRESH_MS = 5000;
const SERIES_SPAN_MS = 15 * 60 * 1000;
const STEP_MS = 10 * 1000;
const HOUR_MS = 3600 * 1000;
const MAX_CHARTS = 12;

/** What the page shows, for people and for tests (`window.edgetallyDashboard`). */
const state = {
  refreshes: 0,
  /** category → {start, end, step_ms, t: seconds[], count: number[], avg: (number|null)[],
   * distinct, p50, p99: (number|null)[]} — the last three from the sketches, each point
   * its minute's (no prototype: a category may be named "__proto__") */
  charts: Object.create(null),
  /** {category, items: [{key, count}]} */
  topk: null,
  categories: [],
  error: null,
};
window.edgetallyDashboard = state;

const plots = new Map();
let token = sessionStorage.getItem("edgetally-token");
let previous = null;

const $ = (id) => document.getElementById(id);

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  return Number.isInteger(v) ? v.toLocaleString("en") : v.toLocaleString("en", { maximumFractionDigits: 3 });
}

/** Replaces a table body's rows; every cell is text. */
function fill(tbody, rows) {
  tbody.replaceChildren(
    ...rows.map((cells) => {
      const tr = document.createElement("tr");
      for (const c of cells) {
        const td = document.createElement("td");
        td.textContent = fmt(c);
        tr.append(td);
      }
      return tr;
    }),
  );
}

class Unauthorized extends Error {}

async function api(path) {
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const res = await fetch(path, { headers, cache: "no-store" });
  if (res.status === 401 || res.status === 403) throw new Unauthorized(path);
  const body = await res.json();
  if (!res.ok && !path.startsWith("/readyz")) throw new Error(`${path}: ${body.error}: ${body.message}`);
  return body;
}

function statRow(key, r) {
  return [key ?? "(no entity)", r.count, r.sum, r.avg, r.min, r.max];
}

function chart(category, data) {
  let box = plots.get(category);
  const series = [data.t, data.count, data.avg, data.p50, data.p99, data.distinct];
  if (box) {
    box.plot.setData(series);
    return;
  }
  const div = document.createElement("div");
  div.className = "chart";
  const h = document.createElement("h3");
  h.textContent = category;
  div.append(h);
  $("charts").append(div);
  const plot = new uPlot(
    {
      width: 460,
      height: 200,
      scales: { x: { time: true }, avg: {}, distinct: {} },
      axes: [
        {},
        { label: "count" },
        { side: 1, scale: "avg", label: "value", grid: { show: false } },
        { side: 1, scale: "distinct", label: "distinct", grid: { show: false } },
      ],
      series: [
        {},
        { label: "count", stroke: "#1f77b4", fill: "rgba(31,119,180,0.12)", width: 1.5 },
        { label: "avg", stroke: "#ff7f0e", scale: "avg", width: 1.5, spanGaps: false },
        { label: "p50", stroke: "#9467bd", scale: "avg", width: 1, dash: [4, 3], spanGaps: false },
        { label: "p99", stroke: "#9467bd", scale: "avg", width: 1, spanGaps: false },
        { label: "distinct", stroke: "#2ca02c", scale: "distinct", width: 1.5, spanGaps: false },
      ],
      // The p50–p99 band.
      bands: [{ series: [4, 3], fill: "rgba(148,103,189,0.15)" }],
    },
    series,
    div,
  );
  plots.set(category, { plot, div });
}

async function refresh() {
  const status = await api("/v1/status");
  // The token (if any) was accepted.
  $("auth").hidden = true;
  const now = status.as_of_ms;
  const ready = await api("/readyz");
  const badge = $("ready");
  badge.textContent = ready.ready ? "ready" : "not ready";
  badge.className = `badge ${ready.ready ? "ok" : "bad"}`;
  badge.title = JSON.stringify(ready.checks);
  $("node").textContent = `node ${status.node.slice(0, 16)}… · v${status.version} · up ${Math.round(status.uptime_ms / 1000)} s`;
  $("clock").textContent = new Date(now).toISOString();

  // Ingest: totals and rates since the last refresh.
  const rate = (k) =>
    previous ? ((status[k] - previous.status[k]) * 1000) / Math.max(1, now - previous.now) : null;
  fill($("rates").tBodies[0], [
    ["batches applied", status.batches_applied, rate("batches_applied") === null ? "–" : `${fmt(rate("batches_applied"))}/s`],
    ["duplicates", status.batches_duplicate, rate("batches_duplicate") === null ? "–" : `${fmt(rate("batches_duplicate"))}/s`],
    ["pulled from peers", status.batches_pulled, "–"],
    ["ingest queue", status.queue_depth, "–"],
  ]);
  previous = { status, now };

  // Categories over the last hour.
  const hourStart = now - HOUR_MS;
  const totals = await api(`/v1/totals?group_by=category&start=${hourStart}&end=${now + 1000}`);
  const groups = totals.groups.filter((g) => g.count > 0);
  state.categories = groups.map((g) => g.key);
  fill($("categories").tBodies[0], groups.map((g) => statRow(g.key, g)));

  // One chart per category (the most counted first).
  const start = Math.floor((now - SERIES_SPAN_MS) / STEP_MS) * STEP_MS;
  const end = Math.floor(now / STEP_MS) * STEP_MS + STEP_MS;
  const charted = [...groups].sort((a, b) => b.count - a.count).slice(0, MAX_CHARTS);
  for (const g of charted) {
    const q = new URLSearchParams({ category: g.key, start, end, step_ms: STEP_MS, quantiles: "0.5,0.99" });
    const s = await api(`/v1/series?${q}`);
    const quantile = (p, i) => p.quantiles?.values[i].value ?? null;
    const data = {
      start,
      end,
      step_ms: STEP_MS,
      t: s.points.map((p) => p.time_window_start / 1000),
      count: s.points.map((p) => p.count),
      avg: s.points.map((p) => p.avg),
      distinct: s.points.map((p) => p.distinct?.estimate ?? null),
      p50: s.points.map((p) => quantile(p, 0)),
      p99: s.points.map((p) => quantile(p, 1)),
    };
    state.charts[g.key] = data;
    chart(g.key, data);
  }
  for (const [category, box] of plots) {
    if (!charted.some((g) => g.key === category)) {
      box.plot.destroy();
      box.div.remove();
      plots.delete(category);
      delete state.charts[category];
    }
  }

  // Top entities of the chosen category (at first, the most counted one).
  const select = $("topk-category");
  const byCount = [...groups].sort((a, b) => b.count - a.count).map((g) => g.key);
  const chosen = byCount.includes(select.value) ? select.value : byCount[0];
  select.replaceChildren(
    ...byCount.map((c) => {
      const o = document.createElement("option");
      o.value = c;
      o.textContent = c;
      o.selected = c === chosen;
      return o;
    }),
  );
  if (chosen !== undefined) {
    const q = new URLSearchParams({ category: chosen, start: hourStart, end: now + 1000, k: 10, by: "entity" });
    const top = await api(`/v1/topk?${q}`);
    state.topk = { category: chosen, start: hourStart, end: now + 1000, items: top.items };
    fill($("topk").tBodies[0], top.items.map((r) => statRow(r.key, r)));
  }

  // Cluster and peers.
  const topo = status.topology;
  $("cluster").textContent = topo
    ? `shard group ${topo.group} · topology v${topo.version}`
    : status.peers.length
      ? `${status.peers.length} peer(s) · ${status.complete ? "sees all of them" : "does not see all of them"}`
      : "a single node (no peers)";
  fill(
    $("peers").tBodies[0],
    status.peers.map((p) => [p.addr, p.reachable ? "yes" : "no", p.lag_seconds, p.lag_batches, p.pulled, p.pushed, p.last_error ?? ""]),
  );
}

async function loop() {
  try {
    await refresh();
    state.error = null;
    $("error").hidden = true;
    $("auth").hidden = true;
  } catch (e) {
    state.error = String(e);
    if (e instanceof Unauthorized) {
      $("auth").hidden = false;
    } else {
      $("error").textContent = String(e);
      $("error").hidden = false;
    }
  }
  state.refreshes += 1;
  setTimeout(loop, REFRESH_MS);
}

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("edgetally-token", token);
  refresh().then(() => ($("auth").hidden = true), () => {});
});
$("topk-category").addEventListener("change", () => refresh().catch(() => {}));
loop();
