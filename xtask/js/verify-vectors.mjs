// Runs the signature vectors through the wasm32 build of edgetally-proto (its `et_verify`
// export) and compares each verdict with the native one (the file name's suffix).
// Usage: node verify-vectors.mjs MODULE.wasm VECTOR_DIR
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";

const [module, dir] = process.argv.slice(2);
const { instance } = await WebAssembly.instantiate(readFileSync(module), {});
const { memory, et_alloc, et_verify } = instance.exports;
let checked = 0;
for (const f of readdirSync(dir).sort()) {
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
