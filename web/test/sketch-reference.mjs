// An independent computation of edgetally's sketches in JavaScript (docs/PROTOCOL.md §10):
// SipHash-2-4 of a subject, the HyperLogLog registers and Ertl's estimate, the quantile
// sketch's bucket keys and the value a quantile answers — none of it from the wasm module.

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
export function registers(hashes, p) {
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
export function ertl(regs, p) {
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
export function quantile(values, q) {
  const gamma = 1.01 / 0.99;
  const lg = Math.log(gamma);
  const keys = values.map((v) => Math.ceil(Math.log(v) / lg)).sort((a, b) => a - b);
  const k = keys[Math.floor(q * (keys.length - 1))];
  return (2 * Math.exp(k * lg)) / (gamma + 1);
}

/** The distinct estimate (rounded) of these subjects (unkeyed hash) at precision `p`. */
export function distinctEstimate(subjects, p) {
  const enc = new TextEncoder();
  const hashes = subjects.map((s) => siphash24(new Uint8Array(16), enc.encode(s)));
  return Math.round(ertl(registers(hashes, p), p));
}

/** What the quantile sketch answers for the q-quantile of these (positive or zero) values. */
export function sketchQuantile(values, q) {
  const sorted = values.slice().sort((a, b) => a - b);
  const v = sorted[Math.floor(q * (sorted.length - 1))];
  if (v < 1e-9) return 0;
  return quantile([v], 0);
}
