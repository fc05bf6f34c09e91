// The examples in examples/ run in each real runtime — native Rust over QUIC, Node, Deno,
// workerd and headless Chromium — against a real merger; the merger's answers must equal the workload's model.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { writeFile } from "node:fs/promises";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { dirname } from "node:path";
import { BIN as MERGER_BIN, CHROMIUM_ARGS, compare, freePort, getJson, metric, Model, ROOT, startMerger, staticServer, tempDir } from "./helpers.mjs";
import { distinctEstimate, sketchQuantile } from "./sketch-reference.mjs";

const WEB = join(ROOT, "web");
const BIN = join(WEB, "node_modules", ".bin");

/** What examples/js/workload.mjs records, computed independently. */
function workloadModel() {
  const m = new Model();
  for (let i = 0; i < 1000; i++) m.add("temperature", `sensor-${i % 4}`, 20 + (i % 50) / 10);
  for (let i = 0; i < 5000; i++) m.add("requests", "edge-1", 1 + (i % 3));
  for (let i = 0; i < 10_000; i++) m.add("latency_ms", undefined, (i % 200) / 4);
  for (let i = 0; i < 2000; i++) m.add("page_view", undefined, 1);
  return m;
}
const TOTAL = 18_000;

/** Runs a command to completion (bounded), returning stdout. */
function run(cmd, args, { timeoutMs = 60_000, cwd = ROOT } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${cmd} timed out: ${err}`));
    }, timeoutMs);
    child.once("exit", (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(" ")} exited ${code}: ${err}\n${out}`));
    });
  });
}

/** The example's reply must show everything acked, and the merger must hold exactly the model. */
async function check(m, result) {
  assert.equal(result.error, undefined, `${result.error}: ${result.message}`);
  assert.equal(result.stats.recorded, TOTAL);
  assert.equal(result.stats.ackedRecords, TOTAL);
  assert.equal(result.stats.invalid + result.stats.rejected + result.stats.dropped, 0);
  const mismatches = await compare(m.http, workloadModel(), result.base - 60_000, result.base + 1000);
  assert.deepEqual(mismatches, []);
  // The sketches, against an independent computation (SipHash, the registers, Ertl's
  // estimate; the bucket keys): 300 visitors, and the latencies' p50 and p99.
  const visitors = Array.from({ length: 300 }, (_, i) => `visitor-${i}`);
  const start = Math.floor((result.base - 60_000) / 60_000) * 60_000;
  const end = result.base + 60_000;
  const pv = await getJson(`${m.http}/v1/aggregate?category=page_view&start=${start}&end=${end}`);
  assert.equal(pv.distinct.estimate, distinctEstimate(visitors, 14));
  const latencies = Array.from({ length: 10_000 }, (_, i) => (i % 200) / 4);
  const l = await getJson(`${m.http}/v1/aggregate?category=latency_ms&start=${start}&end=${end}&quantiles=0.5,0.99`);
  for (const [i, q] of [0.5, 0.99].entries()) {
    const want = sketchQuantile(latencies, q);
    assert.ok(Math.abs(l.quantiles.values[i].value - want) <= 1e-12 * want, `p${q}: ${l.quantiles.values[i].value} vs ${want}`);
  }
}

async function withMerger(f) {
  const m = await startMerger();
  try {
    await f(m);
  } finally {
    await m.cleanup();
  }
}

test("native: examples/native/producer.rs over QUIC", () =>
  withMerger(async (m) => {
    // Built next to the merger binary by `cargo xtask test`.
    const out = await run(join(dirname(MERGER_BIN), "native-producer"), [m.quic, m.certHash]);
    const result = JSON.parse(out);
    assert.equal(result.runtime, "native");
    await check(m, result);
  }));

test("Node: examples/node/record.mjs", () =>
  withMerger(async (m) => {
    const out = await run(process.execPath, ["examples/node/record.mjs", m.http]);
    const result = JSON.parse(out);
    assert.match(result.runtime, /^node v\d+/);
    await check(m, result);
  }));

test("Deno: examples/deno/record.ts", () =>
  withMerger(async (m) => {
    const out = await run(join(BIN, "deno"), [
      "run",
      "--config",
      "examples/deno/deno.json",
      "--allow-net=127.0.0.1",
      `--allow-read=${WEB}`,
      "examples/deno/record.ts",
      m.http,
    ]);
    const result = JSON.parse(out);
    assert.match(result.runtime, /^deno \d+/);
    await check(m, result);
  }));

test("Deno: a script that awaits flush() without a timeout stays alive until its events are delivered", async () => {
  // The merger is down when the script starts and comes up 2 s later.
  const port = await freePort();
  const dir = tempDir();
  const file = join(dir, "late.ts");
  await writeFile(
    file,
    `import { Producer } from "edgetally";
    const p = await Producer.create({ endpoints: ["http://127.0.0.1:${port}"] });
    p.record("late_merger_deno", 4, { ts_ms: Date.now() });
    await p.flush();
    console.log(JSON.stringify({ acked: p.stats().ackedRecords, retried: p.stats().retried }));
    await p.close();`,
  );
  const done = run(join(BIN, "deno"), [
    "run", "--config", "examples/deno/deno.json", "--allow-net=127.0.0.1", `--allow-read=${WEB},${dir}`, file,
  ]);
  await new Promise((r) => setTimeout(r, 2000));
  const m = await startMerger({ httpPort: port });
  try {
    const got = JSON.parse((await done).trim());
    assert.equal(got.acked, 1);
    assert.ok(got.retried >= 1, JSON.stringify(got));
    const want = new Model();
    want.add("late_merger_deno", undefined, 4);
    const now = Date.now();
    assert.deepEqual(await compare(m.http, want, now - 120_000, now + 60_000), []);
  } finally {
    await m.cleanup();
  }
});

/** Polls until `url` answers (bounded). */
async function waitForHttp(url, ms = 20_000) {
  const until = Date.now() + ms;
  for (;;) {
    try {
      await fetch(url, { method: "HEAD" });
      return;
    } catch (e) {
      if (Date.now() > until) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

test("workerd: examples/workerd/worker.mjs", () =>
  withMerger(async (m) => {
    const port = await freePort();
    const child = spawn(
      join(BIN, "workerd"),
      ["serve", "examples/workerd/config.capnp", "--socket-addr", `http=127.0.0.1:${port}`],
      { cwd: ROOT, stdio: ["ignore", "inherit", "inherit"] },
    );
    try {
      await waitForHttp(`http://127.0.0.1:${port}/healthz`);
      const res = await fetch(`http://127.0.0.1:${port}/?endpoint=${encodeURIComponent(m.http)}`);
      const result = await res.json();
      assert.equal(result.runtime, "workerd");
      await check(m, result);
      // ctx.waitUntil(producer.flush()): the reply comes before the batches, which still arrive.
      const fired = await (await fetch(`http://127.0.0.1:${port}/fire?n=250&category=wait_until&endpoint=${encodeURIComponent(m.http)}`)).json();
      assert.equal(fired.recorded, 250);
      const want = new Model();
      for (let i = 0; i < 250; i++) want.add("wait_until", undefined, i % 7);
      const now = Date.now();
      let bad;
      for (let i = 0; i < 150; i++) {
        bad = await compare(m.http, want, now - 120_000, now + 60_000);
        if (bad.length === 0) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      assert.deepEqual(bad, []);
    } finally {
      child.kill("SIGKILL");
    }
  }));

test("Chromium: examples/browser/index.html", () =>
  withMerger(async (m) => {
    const server = await staticServer();
    const browser = await chromium.launch({
      executablePath: "/usr/bin/chromium",
      args: CHROMIUM_ARGS,
      timeout: 30_000,
    });
    try {
      const page = await browser.newPage();
      const errors = [];
      page.on("pageerror", (e) => errors.push(String(e)));
      const url = `http://127.0.0.1:${server.address().port}/examples/browser/index.html?endpoint=${encodeURIComponent(m.http)}`;
      await page.goto(url);
      await page.waitForFunction(() => window.edgetallyResult !== undefined, null, { timeout: 40_000 });
      const result = await page.evaluate(() => window.edgetallyResult);
      assert.deepEqual(errors, []);
      assert.match(result.runtime, /Chrome\//);
      await check(m, result);
      // "auto" took WebTransport (pinning the hashes the merger publishes), and the merger
      // received the batches that way.
      assert.ok(result.stats.sentByTransport.webtransport > 0, JSON.stringify(result.stats));
      assert.equal(result.stats.sentByTransport.http, 0);
      const received = (t) => metric(m.http, `edgetally_batches_received_total{transport="${t}"}`);
      assert.ok((await received("webtransport")) >= result.stats.acked);
      assert.equal(await received("http"), 0);
      // A WebTransport session that cannot be made (a pin matching no certificate): "auto"
      // falls back to HTTP for that merger and still delivers everything, exactly once.
      const fallback = await page.evaluate(async (endpoint) => {
        const { Producer } = await import("edgetally");
        const p = await Producer.create({
          endpoints: [endpoint],
          flushIntervalMs: 50,
          serverCertificateHashes: ["00".repeat(32)],
        });
        for (let i = 0; i < 300; i++) p.record("fallback", i, { entity: `e${i % 3}` });
        await p.flush({ timeoutMs: 20_000 });
        const stats = p.stats();
        await p.close();
        return stats;
      }, m.http);
      assert.equal(fallback.ackedRecords, 300);
      assert.ok(fallback.sentByTransport.http > 0, JSON.stringify(fallback));
      const agg = await (await fetch(`${m.http}/v1/aggregate?category=fallback&start=0&end=9999999999999`)).json();
      assert.equal(agg.count, 300);
      assert.equal(agg.sum_exact, String((299 * 300) / 2));
      // Leaving the page right after recording, long before the flush interval: pagehide
      // seals; WebCrypto signs asynchronously, and if the page lives that long (Chromium keeps
      // a page being navigated from running for a moment) the batch goes out with keepalive
      // fetch, which outlives the page; else it waits in localStorage for the origin's next
      // page. Delivered, exactly once, either way.
      await page.evaluate(async (endpoint) => {
        const { Producer } = await import("edgetally");
        const p = await Producer.create({ endpoints: [endpoint], flushIntervalMs: 60_000 });
        for (let i = 0; i < 500; i++) p.record("leave", 2, { entity: `e${i % 5}` });
        window.leaving = p;
      }, m.http);
      await page.goto("about:blank");
      const leftAt = async () => (await fetch(`${m.http}/v1/aggregate?category=leave&start=0&end=9999999999999`)).json();
      let left = {};
      for (let i = 0; i < 50 && left.count !== 500; i++) {
        await new Promise((r) => setTimeout(r, 100));
        left = await leftAt();
      }
      if (left.count !== 500) {
        console.log(`# the left page's batch waited for the next page (${JSON.stringify(left)})`);
        await page.goto(`http://127.0.0.1:${server.address().port}/web/test/page.html`);
        await page.evaluate(async (endpoint) => {
          const { Producer } = await import("edgetally");
          window.next = await Producer.create({ endpoints: [endpoint] });
        }, m.http);
        for (let i = 0; i < 100 && left.count !== 500; i++) {
          await new Promise((r) => setTimeout(r, 100));
          left = await leftAt();
        }
      }
      assert.equal(left.count, 500, JSON.stringify(left));
      assert.equal(left.sum_exact, "1000");
    } finally {
      await browser.close();
      server.close();
    }
  }));

/** Polls the merger until (category[, entity]) holds `count` records (bounded); returns the aggregate. */
async function until(http, category, count, { entity, ms = 30_000 } = {}) {
  const q = new URLSearchParams({ category, start: "0", end: "9999999999999" });
  if (entity !== undefined) q.set("entity", entity);
  let got = {};
  for (const stop = Date.now() + ms; Date.now() < stop; ) {
    got = await (await fetch(`${http}/v1/aggregate?${q}`)).json();
    if (got.count >= count) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return got;
}

/** Opens the test page and waits for the package to load. */
async function open(page, url) {
  await page.goto(url);
  await page.waitForFunction(() => window.edgetally !== undefined, null, { timeout: 20_000 });
}

/** In the page: a producer recording `n` events of `category` (value i % 10, entity `e${i % 4}` or `entity`), kept as window.p. */
function recordIn(page, endpoint, category, n, options = {}) {
  return page.evaluate(
    async ({ endpoint, category, n, options }) => {
      const p = window.p ?? (window.p = await window.edgetally.Producer.create({ endpoints: [endpoint], flushIntervalMs: 50, adoptIntervalMs: 300, ...options.create }));
      let thrown = 0;
      // Random entity names (options.random bytes each), which storage cannot compress.
      const names = Array.from({ length: options.keys ?? 4 }, (_, k) =>
        options.random ? Array.from(crypto.getRandomValues(new Uint8Array(options.random)), (b) => b.toString(16).padStart(2, "0")).join("") : `e${k}`,
      );
      for (let i = 0; i < n; i++) {
        try {
          p.record(category, i % 10, { entity: options.entity ?? names[i % names.length] });
        } catch {
          thrown++;
        }
      }
      // Wait until everything is sealed and every batch not yet acked is stored.
      for (let i = 0; i < 200; i++) {
        const s = p.stats();
        if (s.pending === 0 && (options.wait === "acked" ? s.queued + s.inFlight === 0 : s.stored >= s.queued + s.inFlight - (options.slack ?? 0))) break;
        await new Promise((r) => setTimeout(r, 25));
      }
      return { ...p.stats(), thrown };
    },
    { endpoint, category, n, options },
  );
}

/** What `recordIn` puts in the merger for `n` events: the count and the exact sum. */
const sumOf = (n) => String(Array.from({ length: n }, (_, i) => i % 10).reduce((a, b) => a + b, 0));

test("Chromium: a burst recorded once, with no further call, is delivered in one tab and in two", async () => {
  // Issue 28, finding 5: the sealed batch waited for the page's next call. The pages record
  // a burst and then do nothing at all; the test only watches the merger.
  const m = await startMerger();
  const server = await staticServer();
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS, timeout: 30_000 });
  const url = `http://127.0.0.1:${server.address().port}/web/test/page.html`;
  try {
    const ctx = await browser.newContext();
    const burst = (page, category) =>
      page.evaluate(
        async ({ endpoint, category }) => {
          const p = await window.edgetally.Producer.create({ endpoints: [endpoint], flushIntervalMs: 2000 });
          for (let i = 0; i < 200; i++) p.record(category, i % 10);
          window.p = p;
        },
        { endpoint: m.http, category },
      );
    const one = await ctx.newPage();
    await open(one, url);
    await burst(one, "quiet_one_tab");
    const got = await until(m.http, "quiet_one_tab", 200, { ms: 10_000 });
    assert.equal(got.count, 200, JSON.stringify(got));
    const [a, b] = [await ctx.newPage(), await ctx.newPage()];
    for (const t of [a, b]) await open(t, url);
    await burst(a, "quiet_tab_a");
    await burst(b, "quiet_tab_b");
    for (const c of ["quiet_tab_a", "quiet_tab_b"]) {
      const g = await until(m.http, c, 200, { ms: 10_000 });
      assert.equal(g.count, 200, `${c}: ${JSON.stringify(g)}`);
      assert.equal(g.sum_exact, sumOf(200));
    }
  } finally {
    await browser.close();
    server.close();
    await m.cleanup();
  }
});

test("Chromium: nothing recorded is lost to offline periods, reloads, closed tabs, merger restarts or a full quota", async () => {
  const dir = tempDir();
  const port = await freePort();
  let m = await startMerger({ dir, httpPort: port });
  const server = await staticServer();
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: CHROMIUM_ARGS,
    timeout: 30_000,
  });
  const url = `http://127.0.0.1:${server.address().port}/web/test/page.html`;
  try {
    // 1. Offline → record → the page goes → online → the next page resends, exactly once.
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await open(page, url);
    // The producer (and its wasm module) is made online; an offline app has them cached.
    // Over HTTP: Chromium's offline emulation stops fetch but not a WebTransport session
    // already open, so with one up (its discovery races this step) batches would still go.
    await recordIn(page, m.http, "offline_reload", 0, { create: { transport: "http" } });
    await ctx.setOffline(true);
    const offline = await recordIn(page, m.http, "offline_reload", 400);
    assert.equal(offline.acked, 0, JSON.stringify(offline));
    assert.ok(offline.stored > 0 && offline.stored === offline.queued + offline.inFlight, JSON.stringify(offline));
    await page.goto("about:blank");
    assert.equal((await until(m.http, "offline_reload", 1, { ms: 500 })).count ?? 0, 0);
    await ctx.setOffline(false);
    await open(page, url);
    await recordIn(page, m.http, "offline_reload_next", 10, { wait: "acked" });
    const back = await until(m.http, "offline_reload", 400);
    assert.equal(back.count, 400, JSON.stringify(back));
    assert.equal(back.sum_exact, sumOf(400));
    const adopted = await page.evaluate(async () => {
      for (let i = 0; i < 100 && window.p.stats().adopted.ackedRecords < 400; i++) await new Promise((r) => setTimeout(r, 50));
      return window.p.stats().adopted;
    });
    assert.ok(adopted.epochs >= 1 && adopted.ackedRecords >= 400, JSON.stringify(adopted));

    // 1b. A page left right after recording more than the 64 KiB keepalive budget carries
    //     (900 series, ~180 KiB sealed): keepalive takes what fits, IndexedDB cannot commit
    //     during unload, localStorage keeps the rest, and the next page resends it — exactly once.
    const l = await ctx.newPage();
    l.on("pageerror", (e) => errors.push(String(e)));
    await open(l, url);
    const before = await l.evaluate(async (endpoint) => {
      const p = await window.edgetally.Producer.create({ endpoints: [endpoint], transport: "http", flushIntervalMs: 60_000 });
      for (let i = 0; i < 900; i++) p.record("leave_now", i % 10, { entity: "x".repeat(150) + i });
      return p.stats();
    }, m.http);
    assert.equal(before.acked, 0, JSON.stringify(before));
    await l.goto("about:blank");
    await open(l, url);
    // localStorage is page-writable: spills a script mangled are skipped, never thrown on.
    await l.evaluate(() => {
      localStorage.setItem("edgetally:edgetally:spill:not-an-epoch", "x");
      localStorage.setItem("edgetally:edgetally:spill:424242", JSON.stringify([[1, "!!not base64"], "junk", [2], [-1, "AA=="]]));
    });
    await recordIn(l, m.http, "leave_now_next", 10, { wait: "acked" });
    const left = await until(m.http, "leave_now", 900);
    assert.equal(left.count, 900, JSON.stringify(left));
    assert.equal(left.sum_exact, sumOf(900));
    const junk = await l.evaluate(async () => {
      for (let i = 0; i < 100 && localStorage.getItem("edgetally:edgetally:spill:424242") !== null; i++) await new Promise((r) => setTimeout(r, 50));
      return { epoch: localStorage.getItem("edgetally:edgetally:spill:424242"), other: localStorage.getItem("edgetally:edgetally:spill:not-an-epoch") };
    });
    // The decimal epoch held nothing usable and is forgotten; the other key is not ours to touch.
    assert.deepEqual(junk, { epoch: null, other: "x" });
    await l.close();

    // 2. Two tabs record; the merger is killed; both record on; one tab is closed; the merger
    //    comes back: the live tab delivers its own batches and adopts the closed tab's.
    const a = await ctx.newPage();
    const b = await ctx.newPage();
    for (const t of [a, b]) {
      t.on("pageerror", (e) => errors.push(String(e)));
      await open(t, url);
    }
    await recordIn(a, m.http, "two_tabs", 100, { entity: "A", wait: "acked" });
    await recordIn(b, m.http, "two_tabs", 100, { entity: "B", wait: "acked" });
    await m.kill9();
    const sa = await recordIn(a, m.http, "two_tabs", 200, { entity: "A" });
    await recordIn(b, m.http, "two_tabs", 200, { entity: "B" });
    assert.ok(sa.stored > 0, JSON.stringify(sa));
    await a.close();
    m = await startMerger({ dir, httpPort: port });
    for (const e of ["A", "B"]) {
      const got = await until(m.http, "two_tabs", 300, { entity: e });
      assert.equal(got.count, 300, `${e}: ${JSON.stringify(got)}`);
      assert.equal(got.sum_exact, String(Number(sumOf(100)) + Number(sumOf(200))));
    }
    await b.close();

    // 3. A tiny storage quota while offline: the oldest batches are dropped and counted,
    //    record() never throws, and everything not dropped still arrives once online.
    //    (Chromium enforces an overridden quota in a profile on disk, not in an incognito context.)
    const profile = tempDir("edgetally-chromium-");
    const qctx = await chromium.launchPersistentContext(profile, {
      executablePath: "/usr/bin/chromium",
      args: CHROMIUM_ARGS,
      timeout: 30_000,
    });
    const q = await qctx.newPage();
    q.on("pageerror", (e) => errors.push(String(e)));
    await open(q, url);
    const cdp = await qctx.newCDPSession(q);
    await cdp.send("Storage.overrideQuotaForOrigin", { origin: new URL(url).origin, quotaSize: 256 * 1024 });
    await recordIn(q, m.http, "quota", 0);
    await qctx.setOffline(true);
    let full;
    for (let round = 0; round < 20; round++) {
      full = await recordIn(q, m.http, "quota", 500, { keys: 500, random: 90, slack: 1 << 30 });
      if (full.dropped > 0) break;
    }
    assert.equal(full.thrown, 0);
    assert.ok(full.dropped > 0, JSON.stringify(full));
    await qctx.setOffline(false);
    const settled = await q.evaluate(async () => {
      await window.p.flush({ timeoutMs: 30_000 });
      return window.p.stats();
    });
    assert.equal(settled.recorded, settled.ackedRecords + settled.droppedRecords, JSON.stringify(settled));
    const got = await until(m.http, "quota", settled.ackedRecords);
    assert.equal(got.count, settled.ackedRecords);
    assert.deepEqual(errors, []);
    await qctx.close();
    rmSync(profile, { recursive: true, force: true });
    await ctx.close();
  } finally {
    await browser.close();
    server.close();
    await m.cleanup();
  }
});
