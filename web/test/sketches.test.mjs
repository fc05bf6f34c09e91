// Distinct counts and percentiles from Node, checked by an independent computation in
// JavaScript: SipHash-2-4 of each subject (docs/PROTOCOL.md §3), the HyperLogLog registers and
// Ertl's estimator, and the quantile sketch's bucket keys — none of it from the wasm module.

import { test } from "node:test";
import assert from "node:assert/strict";
import { EdgetallyError, Producer } from "edgetally";
import { getJson, startMerger } from "./helpers.mjs";

import { quantile, ertl, registers, siphash24 } from "./sketch-reference.mjs";

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

test("the v2 vector of docs/PROTOCOL.md §10.1, recomputed here", async () => {
  const { readFileSync } = await import("node:fs");
  const doc = readFileSync(new URL("../../docs/PROTOCOL.md", import.meta.url), "utf8");
  const block = /<!-- vector: payload-sketch -->\n```hex\n([\s\S]*?)```/.exec(doc)[1];
  const hex = block.split("\n").map((l) => l.split("#")[0]).join("").replace(/\s+/g, "");
  const payload = Uint8Array.from(hex.match(/../g), (b) => parseInt(b, 16));
  // The subjects' hashes (zero key) and their registers, as §10 states them.
  const enc = new TextEncoder();
  const zero = new Uint8Array(16);
  const h1 = siphash24(zero, enc.encode("user-1"));
  const h2 = siphash24(zero, enc.encode("user-2"));
  assert.equal(h1, 0x4f857e2940a2af46n);
  assert.equal(h2, 0xd35036945d54408bn);
  const regs = registers([h1, h2], 14);
  assert.equal(regs[5089], 2);
  assert.equal(regs[13524], 5);
  // The sparse HyperLogLog's canonical bytes: p, form 0, count, then (gap, rank) per register.
  const varint = (n) => {
    const out = [];
    while (n >= 0x80) {
      out.push((n & 0x7f) | 0x80);
      n >>>= 7;
    }
    out.push(n);
    return out;
  };
  const nonzero = [...regs.entries()].filter(([, r]) => r > 0);
  const hll = [14, 0, ...varint(nonzero.length)];
  let prev = -1;
  for (const [i, r] of nonzero) {
    hll.push(...varint(i - prev - 1), r);
    prev = i;
  }
  // The quantile sketch: 1 %, no zero or overflow, no negative bucket, keys ⌈ln v / ln γ⌉.
  const lg = Math.log(1.01 / 0.99);
  const [k1, k2] = [1.5, 12].map((v) => Math.ceil(Math.log(v) / lg));
  assert.deepEqual([k1, k2], [21, 125]);
  const zigzag = (k) => (k << 1) ^ (k >> 31);
  const q = [100, 0, 0, 0, 0, 0, 2, ...varint(zigzag(k1)), 2, ...varint(k2 - k1 - 1), 1];
  // The sketch section: one summary (index 1), both sketches, each length-prefixed.
  const section = [1, 1, 3, hll.length, ...hll, q.length, ...q];
  assert.deepEqual([...payload.slice(payload.length - section.length)], section);
});
