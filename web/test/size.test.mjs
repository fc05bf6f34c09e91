// The bundle budget (issue 12): wasm module + JavaScript, gzipped, at most 45 KB — what every
// page that records downloads. Sizes are deterministic for a given build, so this is a
// budget check, not a timing.

import assert from "node:assert/strict";
import test from "node:test";
import { bundleSize } from "../bench/size.mjs";

const BUDGET = 45_000;

test("the bundle (wasm + minified JavaScript, gzipped) stays within 45 KB", async () => {
  const s = await bundleSize();
  console.log(`# ${JSON.stringify(s)}`);
  // The module carries no signing code (WebCrypto signs): a regression would show here first.
  assert.ok(s.wasmGz < 40_000, `wasm ${s.wasmGz} bytes gzipped`);
  assert.ok(s.totalGz <= BUDGET, `${s.totalGz} bytes gzipped, budget ${BUDGET}`);
});
