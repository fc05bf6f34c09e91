// The SDK in headless Chromium against a real merger on loopback, WebTransport against fetch:
// ack latency (record one event, await flush(); sequential), batch throughput (500 batches of
// 100 summaries of known series, await flush()), and signed-envelope bytes per event for a summary-per-event
// workload and for an aggregating one (signed envelope bytes; transport framing not counted). Each figure is the median of ROUNDS rounds; the
// merger's `edgetally_batches_received_total` confirms the transport each run used.
// Run: `cargo xtask bench web` (or `node bench/browser.mjs` in web/ after `cargo xtask web`,
// with EDGETALLY_BIN pointing at a release `edgetally`).

import os from "node:os";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS, metric, startMerger, staticServer } from "../test/helpers.mjs";

const ROUNDS = Number(process.env.ROUNDS ?? 5);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))];

/** In the page: one round for `transport`; returns the raw figures. */
async function round(page, endpoint, transport, tag) {
  return page.evaluate(
    async ({ endpoint, transport, tag }) => {
      const { Producer } = window.edgetally;
      const out = {};
      // Ack latency: one event, then await its ack; 100 times in a row (after 10 unmeasured).
      {
        const p = await Producer.create({ endpoints: [endpoint], transport, flushIntervalMs: 3_600_000 });
        const lat = [];
        for (let i = 0; i < 110; i++) {
          p.record(`lat_${tag}`, 1, { entity: `e${i}` });
          const t0 = performance.now();
          await p.flush({ timeoutMs: 10_000 });
          if (i >= 10) lat.push(performance.now() - t0);
        }
        out.latency = lat;
        out.latencyTransport = p.stats().sentByTransport;
        await p.close();
      }
      // Throughput: 50,000 summaries sealed into 500 batches of 100 at once.
      {
        const p = await Producer.create({ endpoints: [endpoint], transport, flushIntervalMs: 3_600_000, maxBatchSummaries: 100 });
        for (let i = 0; i < 100; i++) p.record(`thr_${tag}`, 0, { entity: `e${i}` });
        await p.flush({ timeoutMs: 10_000 });
        const before = p.stats().acked;
        // 100 series the warm-up made known (a new series costs admission budget: SPEC §6),
        // each in 500 one-second buckets of the last ten minutes.
        const now = Date.now();
        for (let i = 0; i < 50_000; i++) p.record(`thr_${tag}`, i % 10, { entity: `e${i % 100}`, ts_ms: now - 1000 * Math.floor(i / 100) });
        const t0 = performance.now();
        await p.flush({ timeoutMs: 60_000 });
        const ms = performance.now() - t0;
        const s = p.stats();
        out.batches = s.acked - before;
        out.throughputMs = ms;
        out.bytesPerSeriesEvent = s.bytesSent / s.recorded;
        out.retried = s.retried;
        out.sent = s.sentByTransport;
        await p.close();
      }
      // Aggregating: 100,000 events into 40 series (10 categories × 4 entities), one batch.
      {
        const p = await Producer.create({ endpoints: [endpoint], transport, flushIntervalMs: 3_600_000 });
        for (let i = 0; i < 100_000; i++) p.record(`agg_${tag}_${i % 10}`, i % 100, { entity: `e${i % 4}` });
        await p.flush({ timeoutMs: 10_000 });
        const s = p.stats();
        out.bytesPerAggregatedEvent = s.bytesSent / s.recorded;
        await p.close();
      }
      return out;
    },
    { endpoint, transport, tag },
  );
}

// The merger's per-producer and per-source rate limits (100 batches/s by default) would set
// the throughput figure; they are off here so the transports are what is measured.
const merger = await startMerger({
  env: { EDGETALLY_PRODUCER_BATCHES_PER_SEC: "0", EDGETALLY_PRODUCER_SUMMARIES_PER_SEC: "0", EDGETALLY_SOURCE_BATCHES_PER_SEC: "0" },
});
const server = await staticServer();
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS, timeout: 30_000 });
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error(String(e)));
  await page.goto(`http://127.0.0.1:${server.address().port}/web/test/page.html`);
  await page.waitForFunction(() => window.edgetally !== undefined, null, { timeout: 20_000 });
  console.log(`browser: ${await browser.version()} headless; merger: ${merger.http}; ${os.cpus().length} × ${os.cpus()[0]?.model ?? "?"}`);
  const figures = { webtransport: [], http: [] };
  for (let r = 0; r < ROUNDS; r++) {
    for (const t of ["webtransport", "http"]) {
      const name = `edgetally_batches_received_total{transport="${t}"}`;
      const before = await metric(merger.http, name);
      const f = await round(page, merger.http, t, `${t}_${r}`);
      f.received = (await metric(merger.http, name)) - before;
      figures[t].push(f);
    }
  }
  if (process.env.DEBUG) console.log(JSON.stringify(figures, (k, v) => (k === "latency" ? undefined : v)));
  for (const [t, fs] of Object.entries(figures)) {
    const lat = fs.flatMap((f) => f.latency);
    const bps = fs.map((f) => (f.batches / f.throughputMs) * 1000);
    console.log(
      `${t.padEnd(12)} ack latency median ${median(lat).toFixed(2)} ms, p90 ${pct(lat, 0.9).toFixed(2)} ms` +
        ` | ${median(bps).toFixed(0)} batches/s (${fs[0].batches} batches of 100 summaries, ${median(fs.map((f) => f.retried))} retried)` +
        ` | ${median(fs.map((f) => f.bytesPerSeriesEvent)).toFixed(1)} envelope B/event one summary per event,` +
        ` ${median(fs.map((f) => f.bytesPerAggregatedEvent)).toFixed(4)} B/event aggregated (100,000 events, 40 series)` +
        ` | merger received ${median(fs.map((f) => f.received))} batches over ${t} per round`,
    );
  }
} finally {
  await browser.close();
  server.close();
  await merger.cleanup();
}
