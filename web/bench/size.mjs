// The npm package's weight as a page downloads it: the wasm module and the JavaScript a
// bundler makes of `import { Producer } from "edgetally"` (esbuild, bundled and minified),
// each gzipped at level 9. `node bench/size.mjs` prints it; test/size.test.mjs holds it to
// the budget.

import { build } from "esbuild";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const WEB = fileURLToPath(new URL("..", import.meta.url));

/** Bytes, raw and gzipped: `{ wasm, wasmGz, js, jsGz, totalGz }`. */
export async function bundleSize() {
  const gz = (b) => gzipSync(b, { level: 9 }).length;
  const wasm = readFileSync(`${WEB}/pkg/edgetally_wasm_bg.wasm`);
  const out = await build({
    entryPoints: [`${WEB}/dist/index.js`],
    bundle: true,
    minify: true,
    write: false,
    format: "esm",
    platform: "neutral",
    // Node's modules are imported only where the package is on a file: URL (never in a page).
    external: ["node:*"],
    logLevel: "error",
  });
  const js = out.outputFiles[0].contents;
  return { wasm: wasm.length, wasmGz: gz(wasm), js: js.length, jsGz: gz(js), totalGz: gz(wasm) + gz(js) };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const s = await bundleSize();
  console.log(
    `bundle: wasm ${s.wasm} bytes (${s.wasmGz} gzipped), JavaScript ${s.js} bytes minified (${s.jsGz} gzipped): ${s.totalGz} bytes gzipped in all`,
  );
}
