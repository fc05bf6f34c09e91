// Test helpers shared by every runtime's test: start a real `edgetally serve`, query it, and
// an independent model of what it should answer (exact sums in BigInt nano-units).

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { readFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
export const BIN = process.env.EDGETALLY_BIN ?? join(ROOT, "target", "debug", "edgetally");

/** A free loopback TCP port (for a merger that must start later at a known address). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export function tempDir(prefix = "edgetally-web-") {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** The environment without EDGETALLY_BIN (the merger reads every EDGETALLY_* as config). */
function mergerEnv() {
  const env = { ...process.env };
  delete env.EDGETALLY_BIN;
  return env;
}

/** Starts `edgetally serve` on loopback; resolves once it prints its addresses. */
export async function startMerger({ dir = tempDir(), httpPort = 0, env = {} } = {}) {
  const child = spawn(
    BIN,
    ["serve", "--data-dir", dir, "--http-addr", `127.0.0.1:${httpPort}`, "--quic-addr", "127.0.0.1:0"],
    { env: { ...mergerEnv(), RUST_LOG: "warn", ...env }, stdio: ["ignore", "pipe", "pipe"] },
  );
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  const info = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`merger did not start in 20 s: ${stderr}`)), 20_000);
    let out = "";
    const seen = {};
    child.stdout.on("data", (d) => {
      out += d;
      for (const line of out.split("\n")) {
        const m = /^(http|quic|cert-sha256|recovered-batches): (.*)$/.exec(line.trim());
        if (m) seen[m[1]] = m[2];
      }
      if (seen["recovered-batches"] !== undefined) {
        clearTimeout(timer);
        resolve(seen);
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`merger exited with ${code}: ${stderr}`));
    });
  });
  const exited = new Promise((r) => child.once("exit", r));
  return {
    dir,
    http: info.http,
    quic: info.quic,
    certHash: info["cert-sha256"],
    recovered: Number(info["recovered-batches"]),
    child,
    async kill9() {
      child.kill("SIGKILL");
      await exited;
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        await exited;
      }
    },
    async cleanup() {
      await this.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export async function getJson(url) {
  const res = await fetch(url);
  const body = await res.json();
  if (res.status !== 200) throw new Error(`${url}: ${res.status} ${JSON.stringify(body)}`);
  return body;
}

/** The merger's aggregate for (category, entity?) over [start, end). */
export function aggregate(http, { category, entity, start, end }) {
  const q = new URLSearchParams({ category, start: String(start), end: String(end) });
  if (entity !== undefined) q.set("entity", entity);
  return getJson(`${http}/v1/aggregate?${q}`);
}

/** Exact decimal → BigInt nano-units (the merger's `sum_exact`). */
export function nanos(decimal) {
  const m = /^(-?)(\d+)(?:\.(\d{1,9}))?$/.exec(decimal);
  if (!m) throw new Error(`not a decimal: ${decimal}`);
  const v = BigInt(m[2]) * 1_000_000_000n + BigInt((m[3] ?? "").padEnd(9, "0"));
  return m[1] ? -v : v;
}

/**
 * The exact quantisation of SPEC's numeric model, from the float's bits in BigInt:
 * round_half_even(v · 10⁹) as nano-units. (Independent of the Rust and JavaScript code paths.)
 */
export function quantize(v) {
  if (v === 0) return 0n;
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, v);
  const bits = view.getBigUint64(0);
  const negative = bits >> 63n === 1n;
  const expBits = Number((bits >> 52n) & 0x7ffn);
  const frac = bits & ((1n << 52n) - 1n);
  const [m, e] = expBits === 0 ? [frac, -1074] : [frac | (1n << 52n), expBits - 1075];
  const n = m * 1_000_000_000n;
  let q;
  if (e >= 0) {
    q = n << BigInt(e);
  } else {
    const sh = BigInt(-e);
    const quo = n >> sh;
    const rem = n - (quo << sh);
    const half = 1n << (sh - 1n);
    q = rem > half || (rem === half && (quo & 1n) === 1n) ? quo + 1n : quo;
  }
  return negative ? -q : q;
}

/** The model: per (category, entity) key, count / exact sum / min / max of the values. */
export class Model {
  constructor() {
    this.keys = new Map();
  }
  add(category, entity, value) {
    const k = `${category}\u0000${entity ?? ""}`;
    let e = this.keys.get(k);
    if (!e) {
      e = { category, entity, count: 0, sum: 0n, min: Infinity, max: -Infinity };
      this.keys.set(k, e);
    }
    e.count += 1;
    e.sum += quantize(value);
    e.min = Math.min(e.min, value);
    e.max = Math.max(e.max, value);
  }
  /** Per category, all entities together. */
  categories() {
    const out = new Map();
    for (const e of this.keys.values()) {
      let c = out.get(e.category);
      if (!c) {
        c = { category: e.category, count: 0, sum: 0n, min: Infinity, max: -Infinity };
        out.set(e.category, c);
      }
      c.count += e.count;
      c.sum += e.sum;
      c.min = Math.min(c.min, e.min);
      c.max = Math.max(c.max, e.max);
    }
    return [...out.values()];
  }
}

/** Checks every key and every category of `model` against the merger; returns mismatches. */
export async function compare(http, model, start, end) {
  const bad = [];
  const check = async (want, q) => {
    const got = await aggregate(http, { ...q, start, end });
    const same =
      got.count === want.count && nanos(got.sum_exact) === want.sum && got.min === want.min && got.max === want.max;
    if (!same) bad.push({ q, want: { ...want, sum: String(want.sum) }, got });
  };
  for (const e of model.keys.values()) {
    if (e.entity !== undefined) await check(e, { category: e.category, entity: e.entity });
  }
  for (const c of model.categories()) await check(c, { category: c.category });
  return bad;
}

/**
 * A seeded workload: `n` events over a few categories and entities, timestamps spread over
 * the last minute, values with up to three decimals. Deterministic for a seed, so a runtime
 * test and the model see the same events.
 */
export function workload(seed, n, now) {
  let s = BigInt(seed) | 1n;
  const next = () => {
    s ^= s << 13n;
    s &= (1n << 64n) - 1n;
    s ^= s >> 7n;
    s ^= s << 17n;
    s &= (1n << 64n) - 1n;
    return Number(s % 1_000_000_007n);
  };
  const cats = ["temperature", "latency_ms", "clicks"];
  const events = [];
  for (let i = 0; i < n; i++) {
    const category = cats[next() % cats.length];
    const e = next() % 5;
    const entity = e === 0 ? undefined : `dev-${e}`;
    const value = ((next() % 2_000_001) - 1_000_000) / 1000;
    const ts_ms = now - 60_000 + (next() % 60_000);
    events.push({ category, entity, value, ts_ms });
  }
  return events;
}

/** One value of a merger's /metrics (0 when absent). */
export async function metric(http, name) {
  const text = await (await fetch(`${http}/metrics`)).text();
  for (const line of text.split("\n")) {
    if (line.startsWith(name + " ")) return Number(line.slice(name.length + 1));
  }
  return 0;
}

/** Headless Chromium (Debian's, at /usr/bin/chromium) without background traffic; QUIC stays on for WebTransport. */
export const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

/** Serves the repository read-only on loopback (the page, the package, the wasm). */
export async function staticServer() {
  const server = createHttpServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    const file = join(ROOT, path);
    if (!file.startsWith(ROOT) || !(path.startsWith("/examples/") || path.startsWith("/web/"))) {
      res.writeHead(404).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream" }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return server;
}

