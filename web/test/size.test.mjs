// The bundle budget (issue 12; 50 KB since issue 30 put distinct counts and quantiles in the
// SDK): wasm module + JavaScript, gzipped — what every page that records downloads. Sizes are deterministic for a given build, so this is a
// budget check, not a timing.

import assert from "node:assert/strict";
import test from "node:test";
import { bundleSize } from "../bench/size.mjs";

const BUDGET = 50_000;

test("the bundle (wasm + minified JavaScript, gzipped) stays within 50 KB", async () => {
  const s = await bundleSize();
  console.log(`# ${JSON.stringify(s)}`);
  // The module carries no signing code (WebCrypto signs): a regression would show here first.
  assert.ok(s.wasmGz < 40_000, `wasm ${s.wasmGz} bytes gzipped`);
  assert.ok(s.totalGz <= BUDGET, `${s.totalGz} bytes gzipped, budget ${BUDGET}`);
});
