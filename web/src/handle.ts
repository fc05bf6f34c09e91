// The handle: an interned (category, entity) whose hot path aggregates in JavaScript while
// the bucket the wasm producer opened for it stays open.

import { clock } from "./clock.js";

// The JavaScript fast path sums q = v·10⁹ (a float product) in a float `sum` kept below 2⁵¹
// in magnitude. When q is an integer and |sum + q| < 2⁵¹, then |q| < 2⁵², where ulp(q) ≤ ½,
// so the exact product lies within ¼ of the integer q: q is exactly v's round-half-even
// quantisation (edgetally_core::value::quantize_fast argues the same up to 2⁵¹), and
// sum + q, a sum of integers below 2⁵³, is computed exactly. The integer test is
// Math.floor(q) === q: NaN fails it, ±Infinity passes it and fails the bound. Everything else
// takes the wasm path.
/** @internal */
export const LIM = 2 ** 51;

/** @internal What a handle needs from its producer. */
export interface HandleOwner {
  recordSlow(h: Handle, value: number, ts_ms: number | undefined, subject?: string): void;
}

/**
 * An interned (category, entity): the fast way to record in hot loops. A handle aggregates
 * in JavaScript while its bucket stays open (count, exact sum in nano-units, min, max) and
 * hands the summary to the wasm producer at each flush tick, so most records never leave
 * JavaScript; values the fast path cannot sum exactly go through wasm one by one.
 */
export class Handle {
  /** @internal */ readonly p: HandleOwner;
  /** The handle's number (for `recordMany` with a `Uint32Array` of handles). */
  readonly id: number;
  /** @internal */ readonly ids: Uint32Array;
  /** @internal The open bucket, [start, end) in ms, as the wasm producer opened it; empty when start > end. */
  start = Infinity;
  /** @internal */ end = -Infinity;
  /** @internal Recorded into the open bucket since the last drain. */
  count = 0;
  /** @internal */ sum = 0;
  /** @internal */ min = Infinity;
  /** @internal */ max = -Infinity;
  /** @internal On the producer's list of open handles. */
  listed = false;
  /** @internal */
  constructor(p: HandleOwner, id: number) {
    this.p = p;
    this.id = id;
    this.ids = Uint32Array.of(id);
  }
  /** @internal Its category keeps quantiles: every value goes through wasm. */
  quantiles = false;
  /**
   * Records one value (now, or at `ts_ms`), of `subject` if given (a user, device or session
   * id, for distinct counts). Throws `EdgetallyError` for an invalid value, time or subject
   * (also counted in `stats().invalid`).
   */
  record(value: number, ts_ms?: number, subject?: string): void {
    if (subject !== undefined) {
      this.p.recordSlow(this, value, ts_ms, subject);
      return;
    }
    const ts = ts_ms === undefined ? clock() : ts_ms;
    const q = value * 1e9;
    const s = this.sum + q;
    if (ts >= this.start && ts < this.end && Math.floor(q) === q && s < LIM && s > -LIM) {
      this.count++;
      this.sum = s;
      // `+ 0` turns -0 into 0, as the wasm side does.
      if (value < this.min) this.min = value + 0;
      if (value > this.max) this.max = value + 0;
      return;
    }
    this.p.recordSlow(this, value, ts_ms);
  }
}
