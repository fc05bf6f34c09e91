// Runs the signature vectors through the wasm32 build of edgetally-proto (its `et_verify`
// export) and compares each verdict with the native one (the file name's suffix).
// Usage: node verify-vectors.mjs MODULE.wasm VECTOR_DIR
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";

const [module, dir] = process.argv.slice(2);
const { instance } = await WebAssembly.instantiate(readFileSync(module), {});
const { memory, et_alloc, et_verify, et_sketch, et_apply } = instance.exports;
let checked = 0;
for (const f of readdirSync(dir).sort().filter((f) => !f.startsWith("sketch-") && !f.startsWith("batch-"))) {
  const want = Number(f.split(".").pop());
  const bytes = readFileSync(join(dir, f));
  const ptr = et_alloc(bytes.length);
  new Uint8Array(memory.buffer, ptr, bytes.length).set(bytes);
  const got = et_verify(ptr, bytes.length);
  if (got !== want) {
    console.error(`wasm verdict ${got} != native ${want} for ${f}`);
    process.exit(1);
  }
  checked++;
}
if (checked < 8) {
  console.error(`only ${checked} vectors: the check would be vacuous`);
  process.exit(1);
}
console.log(`wasm32 verdicts equal the native ones on ${checked} signature vectors`);

// The sketches of one corpus: the wasm build's canonical bytes equal the native build's.
const corpus = readFileSync(join(dir, "sketch-corpus"));
const expected = readFileSync(join(dir, "sketch-expected"));
const at = et_alloc(corpus.length);
new Uint8Array(memory.buffer, at, corpus.length).set(corpus);
const out = et_sketch(at, corpus.length);
if (out === 0) {
  console.error("et_sketch refused the corpus");
  process.exit(1);
}
const len = new DataView(memory.buffer).getUint32(out, true);
const got = new Uint8Array(memory.buffer, out + 4, len);
if (len !== expected.length || !got.every((b, i) => b === expected[i])) {
  console.error(`wasm sketch bytes differ from the native ones (${len} against ${expected.length} bytes)`);
  process.exit(1);
}
console.log(`wasm32 sketches equal the native ones, byte for byte (${len} bytes)`);

// Batch format v2 (docs/PROTOCOL.md §10.1): decoded, verified (its sketches checked against
// their summaries) and applied by the wasm build; its one `cpu` record counts.
const v2 = readFileSync(join(dir, "batch-sketch"));
const vp = et_alloc(v2.length);
new Uint8Array(memory.buffer, vp, v2.length).set(v2);
const applied = et_apply(vp, v2.length, 1_700_000_001_000n);
if (applied !== 1001) {
  console.error(`the wasm build answered ${applied} for the v2 vector, not 1001 (applied, one cpu record)`);
  process.exit(1);
}
console.log("wasm32 decodes, verifies and applies the v2 vector");
