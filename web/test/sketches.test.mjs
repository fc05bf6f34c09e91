// Distinct counts and percentiles from Node, checked by an independent computation in
// JavaScript: SipHash-2-4 of each subject (docs/PROTOCOL.md §3), the HyperLogLog registers and
// Ertl's estimator, and the quantile sketch's bucket keys — none of it from the wasm module.

import { test } from "node:test";
import assert from "node:assert/strict";
import { EdgetallyError, Producer } from "edgetally";
import { getJson, startMerger } from "./helpers.mjs";

const M = (1n << 64n) - 1n;
const rotl = (x, b) => ((x << BigInt(b)) | (x >> BigInt(64 - b))) & M;

/** SipHash-2-4 of `bytes` under the 16-byte `key`, as a BigInt. */
export function siphash24(key, bytes) {
  const k0 = new DataView(key.buffer, key.byteOffset).getBigUint64(0, true);
  const k1 = new DataView(key.buffer, key.byteOffset).getBigUint64(8, true);
  let v0 = k0 ^ 0x736f6d6570736575n;
  let v1 = k1 ^ 0x646f72616e646f6dn;
  let v2 = k0 ^ 0x6c7967656e657261n;
  let v3 = k1 ^ 0x7465646279746573n;
  const round = () => {
    v0 = (v0 + v1) & M; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32);
    v2 = (v2 + v3) & M; v3 = rotl(v3, 16); v3 ^= v2;
    v0 = (v0 + v3) & M; v3 = rotl(v3, 21); v3 ^= v0;
    v2 = (v2 + v1) & M; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32);
  };
  const n = bytes.length;
  const padded = new Uint8Array((Math.floor(n / 8) + 1) * 8);
  padded.set(bytes);
  padded[padded.length - 1] = n & 0xff;
  const dv = new DataView(padded.buffer);
  for (let i = 0; i < padded.length; i += 8) {
    const m = dv.getBigUint64(i, true);
    v3 ^= m; round(); round(); v0 ^= m;
  }
  v2 ^= 0xffn;
  round(); round(); round(); round();
  return (v0 ^ v1 ^ v2 ^ v3) & M;
}

/** The registers of a precision-`p` HyperLogLog of these hashes. */
function registers(hashes, p) {
  const regs = new Uint8Array(1 << p);
  for (const h of hashes) {
    const index = Number(h >> BigInt(64 - p));
    const rest = (h << BigInt(p)) & M;
    let lz = 0;
    while (lz < 64 - p && ((rest >> BigInt(63 - lz)) & 1n) === 0n) lz++;
    regs[index] = Math.max(regs[index], lz + 1);
  }
  return regs;
}

/** Ertl's improved raw estimator ("New cardinality estimation algorithms for HyperLogLog sketches", 2017). */
function ertl(regs, p) {
  const q = 64 - p;
  const m = regs.length;
  const c = new Array(q + 2).fill(0);
  for (const r of regs) c[Math.min(r, q + 1)]++;
  const sigma = (x) => {
    if (x === 1) return Infinity;
    let y = 1, z = x;
    for (;;) { x *= x; const before = z; z += x * y; y += y; if (z === before) return z; }
  };
  const tau = (x) => {
    if (x === 0 || x === 1) return 0;
    let y = 1, z = 1 - x;
    for (;;) { x = Math.sqrt(x); const before = z; y *= 0.5; z -= (1 - x) * (1 - x) * y; if (z === before) return z / 3; }
  };
  let z = m * tau(1 - c[q + 1] / m);
  for (let k = q; k >= 1; k--) z = 0.5 * (z + c[k]);
  z += m * sigma(c[0] / m);
  return (0.5 / Math.LN2) * m * m / z;
}

/** The value the quantile sketch answers for the q-quantile (1 % accuracy, positive values only here). */
function quantile(values, q) {
  const gamma = 1.01 / 0.99;
  const lg = Math.log(gamma);
  const keys = values.map((v) => Math.ceil(Math.log(v) / lg)).sort((a, b) => a - b);
  const k = keys[Math.floor(q * (keys.length - 1))];
  return (2 * Math.exp(k * lg)) / (gamma + 1);
}

test("SipHash-2-4 here is the reference function", () => {
  // The reference vector of SipHash-2-4: key 00..0f, message 00..0e → a129ca6149be45e5.
  const key = Uint8Array.from({ length: 16 }, (_, i) => i);
  const msg = Uint8Array.from({ length: 15 }, (_, i) => i);
  assert.equal(siphash24(key, msg), 0xa129ca6149be45e5n);
});

test("subjects and quantiles recorded in Node answer what an independent computation gives", async () => {
  const m = await startMerger();
  try {
    const keyHex = "000102030405060708090a0b0c0d0e0f";
    const p = await Producer.create({
      endpoints: [m.http],
      flushIntervalMs: 50,
      quantileCategories: ["latency"],
      subjectKey: keyHex,
    });
    const key = Uint8Array.from({ length: 16 }, (_, i) => i);
    const enc = new TextEncoder();
    // One minute in the past, so the answer's window (whole minutes) holds it all.
    const minute = Math.floor((Date.now() - 120_000) / 60_000) * 60_000;
    const subjects = new Set();
    const latencies = [];
    const h = p.handle("visits", "home");
    for (let i = 0; i < 4000; i++) {
      const user = `user-${(i * 7919) % 2500}`;
      const ts = minute + (i % 60_000);
      if (i % 2) p.record("visits", 1, { entity: "home", subject: user, ts_ms: ts });
      else h.record(1, ts, user);
      subjects.add(user);
      const v = 1 + ((i * 37) % 1000) / 10 + (i % 97 === 0 ? 50_000 : 0);
      p.record("latency", v, { ts_ms: ts });
      latencies.push(v);
    }
    assert.throws(() => p.record("visits", 1, { subject: "" }), EdgetallyError);
    await p.flush({ timeoutMs: 20_000 });
    const s = p.stats();
    assert.equal(s.rejected + s.dropped, 0, JSON.stringify(s));
    assert.equal(s.invalid, 1);

    const hashes = [...subjects].map((u) => siphash24(key, enc.encode(u)));
    const want = Math.round(ertl(registers(hashes, 14), 14));
    const start = minute;
    const end = minute + 60_000;
    const a = await getJson(`${m.http}/v1/aggregate?category=visits&entity=home&start=${start}&end=${end}`);
    assert.equal(a.count, 4000);
    assert.equal(a.distinct.estimate, want);
    assert.ok(Math.abs(want - subjects.size) / subjects.size < 3 * a.distinct.relative_standard_error);
    const l = await getJson(`${m.http}/v1/aggregate?category=latency&start=${start}&end=${end}&quantiles=0.5,0.9,0.99`);
    assert.equal(l.quantiles.count, latencies.length);
    assert.equal(l.distinct, null);
    for (const [i, q] of [0.5, 0.9, 0.99].entries()) {
      const got = l.quantiles.values[i].value;
      const expect = quantile(latencies, q);
      assert.ok(Math.abs(got - expect) <= 1e-12 * expect, `p${q}: ${got} vs ${expect}`);
    }
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("sketch settings are checked", async () => {
  for (const bad of [{ distinctPrecision: 17 }, { subjectKey: "00" }, { quantileCategories: [""] }]) {
    await assert.rejects(Producer.create({ endpoints: ["http://127.0.0.1:9"], persist: false, ...bad }), EdgetallyError);
  }
});
