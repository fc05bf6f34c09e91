// Records NDJSON events from stdin with the SDK — one per line:
//   {"ts_ms": 1700000000000, "category": "click", "entity": "user-7", "value": 1}
// (the shape POST /v1/events takes) — then waits for every batch to be acknowledged and
// prints the producer's stats as JSON. `cargo xtask demo` feeds it half the user activity.
//   node examples/node/ingest.mjs http://127.0.0.1:7070 < events.ndjson
import { createInterface } from "node:readline";
import { Producer } from "edgetally";

const endpoint = process.argv[2] ?? "http://127.0.0.1:7070";
const producer = await Producer.create({ endpoints: [endpoint] });
let line = 0;
for await (const text of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  line++;
  if (text.trim() === "") continue;
  try {
    const e = JSON.parse(text);
    producer.record(e.category, e.value ?? 1, { entity: e.entity ?? undefined, ts_ms: e.ts_ms });
  } catch (err) {
    console.error(`line ${line}: ${err.code ?? "invalid_json"}: ${err.message}`);
  }
}
await producer.flush({ timeoutMs: 30_000 });
console.log(JSON.stringify({ runtime: `node ${process.version}`, ...producer.stats() }));
await producer.close();
