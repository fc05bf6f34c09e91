// Entry point for Cloudflare Workers / workerd: code generation from bytes is not allowed
// there, so the wasm comes in as a compiled module import (wrangler and workerd's config
// both load `.wasm` imports that way).

import { initSync } from "../pkg/edgetally_wasm.js";
import wasmModule from "../pkg/edgetally_wasm_bg.wasm";
import { setWasmLoader } from "./producer.js";

setWasmLoader(() => {
  initSync({ module: wasmModule });
});

export * from "./producer.js";
