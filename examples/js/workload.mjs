// The JavaScript examples' workload, the same in Node, Deno, workerd and the browser (and
// the tests compute what the merger must answer from the same description):
//   - 1,000 temperature readings by name, from sensor-0..3, one every 50 ms back from `base`;
//   - 5,000 request counts (1, 2, 3, 1, …) through a handle, at `base`;
//   - 10,000 latencies (0, 0.25, …, 49.75, 0, …) in one typed-array call, at `base`: a
//     quantile category, for percentiles;
//   - 2,000 page views by 300 visitors (visitor-0..299, the subject), at `base`: distinct
//     counts.

/**
 * Records the workload with a fresh producer, waits until every batch is acknowledged and
 * returns `{ base, stats }`.
 * @param {typeof import("edgetally").Producer} Producer
 * @param {string} endpoint the merger's HTTP address, e.g. "http://127.0.0.1:7070"
 */
export async function runWorkload(Producer, endpoint, base = Date.now()) {
  const producer = await Producer.create({
    endpoints: [endpoint],
    flushIntervalMs: 100,
    quantileCategories: ["latency_ms"],
  });

  // 1. Events by name: simplest, fine for most traffic.
  for (let i = 0; i < 1000; i++) {
    producer.record("temperature", 20 + (i % 50) / 10, { entity: `sensor-${i % 4}`, ts_ms: base - i * 50 });
  }

  // 2. A handle for a hot loop: no string work per event.
  const requests = producer.handle("requests", "edge-1");
  for (let i = 0; i < 5000; i++) requests.record(1 + (i % 3), base);

  // 3. Typed arrays in bulk: one call for many values.
  const latency = producer.handle("latency_ms");
  const values = Float64Array.from({ length: 10_000 }, (_, i) => (i % 200) / 4);
  producer.recordMany(latency, values, new Float64Array(values.length).fill(base));

  // 4. Who did it: a subject per event, for distinct counts (only its hash leaves).
  for (let i = 0; i < 2000; i++) {
    producer.record("page_view", 1, { subject: `visitor-${(i * 7) % 300}`, ts_ms: base });
  }

  // Resolves once the merger has acknowledged (made durable) everything recorded above.
  await producer.flush({ timeoutMs: 30_000 });
  const stats = producer.stats();
  await producer.close();
  return { base, stats };
}
