// Entry point for Node ≥ 20, Deno, Bun and browsers: the wasm module is read from disk when
// the package lives on a file: URL, and fetched (streaming compile) otherwise.

import init, { initSync } from "../pkg/edgetally_wasm.js";
import { setWasmLoader } from "./producer.js";

setWasmLoader(async () => {
  const url = new URL("../pkg/edgetally_wasm_bg.wasm", import.meta.url);
  if (url.protocol === "file:") {
    // Node's fetch has no file: URLs; Node, Deno and Bun all have node:fs.
    const fsName = "node:fs/promises";
    const fs = (await import(fsName)) as { readFile(u: URL): Promise<Uint8Array> };
    initSync({ module: await fs.readFile(url) });
  } else {
    await init({ module_or_path: url });
  }
});

export * from "./producer.js";
