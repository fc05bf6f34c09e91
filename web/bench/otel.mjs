// One Node process, side by side: the OpenTelemetry JS metrics SDK (`counter.add(v, {category})`
// with a reader that does not export during the loop) against edgetally's string `record`,
// handle `record` and `recordMany`. Each path runs for ~1 s, 7 times; medians are printed with
// the ratio to OpenTelemetry. Run: `cargo xtask bench web` (or `node bench/otel.mjs` in web/
// after `cargo xtask web`).

import os from "node:os";
import { MeterProvider, MetricReader } from "@opentelemetry/sdk-metrics";
import { Producer } from "edgetally";

const ROUNDS = 7;
const ROUND_MS = 1000;
const CATEGORIES = Array.from({ length: 10 }, (_, i) => `category-${i}`);
const VALUES = Float64Array.from({ length: 1024 }, (_, i) => ((i * 37) % 1000) / 8 + 0.125);

/** A reader that never exports on its own: collection is not part of what is measured. */
class ManualReader extends MetricReader {
  async onForceFlush() {}
  async onShutdown() {}
}

/** Calls `chunk(n)` (which does n events) until `ROUND_MS` has passed; returns events/s. */
function rate(chunk) {
  const n = 1 << 16;
  const t0 = performance.now();
  let done = 0;
  let t = t0;
  while (t - t0 < ROUND_MS) {
    chunk(n);
    done += n;
    t = performance.now();
  }
  return (done / (t - t0)) * 1000;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

// OpenTelemetry, as its users write it (`counter.add(v, { category })`, the baseline),
// and with attribute objects made once (its best case), one counter.
const reader = new ManualReader();
const provider = new MeterProvider({ readers: [reader] });
const counter = provider.getMeter("bench").createCounter("events");
const attrs = CATEGORIES.map((category) => ({ category }));
let k = 0;
const otel = (n) => {
  for (let i = 0; i < n; i++) {
    counter.add(VALUES[i & 1023], { category: CATEGORIES[k] });
    k = k === 9 ? 0 : k + 1;
  }
};
const otelPrebuilt = (n) => {
  for (let i = 0; i < n; i++) {
    counter.add(VALUES[i & 1023], attrs[k]);
    k = k === 9 ? 0 : k + 1;
  }
};

// edgetally: nothing listens at the endpoint; the loops are synchronous, so no batch is sent
// while measuring (sealing and signing do happen, when buckets roll over).
const producer = await Producer.create({ endpoints: ["http://127.0.0.1:9"], flushIntervalMs: 3_600_000 });
const str = (n) => {
  for (let i = 0; i < n; i++) {
    producer.record(CATEGORIES[k], VALUES[i & 1023]);
    k = k === 9 ? 0 : k + 1;
  }
};
const handles = CATEGORIES.map((c) => producer.handle(c));
const handle = (n) => {
  for (let i = 0; i < n; i++) {
    handles[k].record(VALUES[i & 1023]);
    k = k === 9 ? 0 : k + 1;
  }
};
const bulkValues = Float64Array.from({ length: 1 << 16 }, (_, i) => VALUES[i & 1023]);
const bulk = (n) => {
  for (let done = 0; done < n; done += bulkValues.length) {
    producer.recordMany(handles[k], bulkValues);
    k = k === 9 ? 0 : k + 1;
  }
};

const paths = [
  ["opentelemetry counter.add(v, {category})", otel],
  ["opentelemetry counter.add(v, prebuilt attrs)", otelPrebuilt],
  ["edgetally record(category, v)", str],
  ["edgetally handle.record(v)", handle],
  ["edgetally recordMany(handle, Float64Array)", bulk],
];
const results = new Map(paths.map(([name]) => [name, []]));
for (let r = 0; r < ROUNDS; r++) {
  for (const [name, f] of paths) results.get(name).push(rate(f));
  await new Promise((res) => setTimeout(res, 0));
}

const cpu = os.cpus()[0]?.model ?? "unknown cpu";
console.log(`node ${process.version}, ${os.cpus().length} × ${cpu}; medians of ${ROUNDS} rounds of ${ROUND_MS} ms`);
const base = median(results.get(paths[0][0]));
for (const [name] of paths) {
  const m = median(results.get(name));
  console.log(`${name.padEnd(46)} ${(m / 1e6).toFixed(2).padStart(8)} M events/s  ${(m / base).toFixed(1).padStart(6)}× OTel`);
}
const s = producer.stats();
console.log(`(edgetally recorded ${s.recorded.toLocaleString("en")} events into ${s.pending + s.queued} pending keys/batches)`);
await provider.shutdown();
process.exit(0);
