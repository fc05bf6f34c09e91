// The edgetally producer SDK: the TypeScript API over the wasm build of the sans-IO producer
// (crates/edgetally-wasm). The wasm side aggregates, seals, signs and schedules; this side
// owns the clock, the timers and the transports (WebTransport where the runtime has it, fetch
// POST /v1/batches everywhere).

import { Core, reasonName } from "../pkg/edgetally_wasm.js";
import { WebTransportLink, webTransportCtor } from "./webtransport.js";

/**
 * How batches travel. `"auto"` (default): WebTransport where the runtime has it (browsers),
 * falling back to HTTP for a merger whose WebTransport session fails — and staying on HTTP for
 * that merger from then on; HTTP elsewhere. `"webtransport"`: WebTransport only. `"http"`:
 * `fetch` only.
 */
export type Transport = "auto" | "http" | "webtransport";

export interface ProducerOptions {
  /** Merger base URLs, e.g. `["http://127.0.0.1:7070"]` (tried in rendezvous order of the producer key). */
  endpoints: string[];
  /** Bucket width in ms: whole seconds dividing a day. Default 1000. */
  bucketMs?: number;
  /** Seal what is pending this long after its first record. Default 1000. */
  flushIntervalMs?: number;
  /** Seal when this many (category, entity, bucket) keys are pending. Default 2000. */
  maxBatchSummaries?: number;
  /** Seal when the pending batch would encode to about this many bytes. Default 262144. */
  maxBatchBytes?: number;
  /** Bound of sealed, unacknowledged batches in bytes; the oldest waiting ones are dropped (counted in `stats().dropped`). Default 8 MiB. */
  maxOutboxBytes?: number;
  /** Batches sent and not yet answered, at most. Default 16. */
  maxInFlight?: number;
  /** Default `"auto"`. */
  transport?: Transport;
  /**
   * SHA-256 (hex) of the certificates to pin for WebTransport. Default: the hashes each merger
   * publishes at `GET /v1/webtransport` (its current and next certificate), read over HTTP(S)
   * from the endpoint. HTTP ignores them.
   */
  serverCertificateHashes?: string[];
  /** Give up on one request after this long (then retry with backoff). Default 10000. */
  requestTimeoutMs?: number;
  /** The fetch to use (a service binding, a test double). Default `globalThis.fetch`. */
  fetch?: typeof fetch;
}

export interface RecordOptions {
  /** The entity (device, user, …); none by default. */
  entity?: string;
  /** Event time in ms since the Unix epoch; now by default. */
  ts_ms?: number;
}

/** Counters since `create`. Batches unless the name says records or bytes. */
export interface Stats {
  recorded: number;
  invalid: number;
  invalidByReason: Record<string, number>;
  /** Keys aggregated and not yet sealed. */
  pending: number;
  /** Sealed batches waiting to be sent or resent. */
  queued: number;
  inFlight: number;
  acked: number;
  ackedRecords: number;
  retried: number;
  rejected: number;
  rejectedByReason: Record<string, number>;
  rejectedRecords: number;
  dropped: number;
  droppedRecords: number;
  bytesSent: number;
  outboxBytes: number;
  /** Batches sent (attempts, resends included) by transport; `keepalive`: of the HTTP ones, those sent while the page was hidden or being left. */
  sentByTransport: { webtransport: number; http: number; keepalive: number };
}

/** Every error the SDK throws. `code` is a stable reason (`"invalid_value"`, `"timeout"`, …). */
export class EdgetallyError extends Error {
  readonly code: string;
  /** The wire reason code (docs/PROTOCOL.md), or 0 for SDK-side reasons. */
  readonly reasonCode: number;
  constructor(code: string | number, message?: string) {
    const name = typeof code === "number" ? reasonName(code) : code;
    super(message ?? `edgetally: ${name}`);
    this.name = "EdgetallyError";
    this.code = name;
    this.reasonCode = typeof code === "number" ? code : 0;
  }
}

let loader: (() => Promise<void> | void) | undefined;
let loaded: Promise<void> | undefined;

/** @internal Set by each entry point: how this runtime gets the wasm module. */
export function setWasmLoader(load: () => Promise<void> | void): void {
  loader = load;
}

function ready(): Promise<void> {
  if (!loaded) {
    if (!loader) throw new EdgetallyError("not_initialized", "edgetally: no wasm loader (import the package entry point)");
    const l = loader;
    loaded = Promise.resolve().then(() => l());
    loaded.catch(() => (loaded = undefined));
  }
  return loaded;
}

// A clock for the hot paths: Date.now() costs ~40 ns, more than a whole record. Within one
// synchronous run of the event loop it is read once per 256 records; every new task or
// microtask checkpoint reads it afresh. Pass ts_ms when records of one synchronous loop are
// spread over more than a bucket.
let clockMs = 0;
let clockLeft = 0;
let clockArmed = false;
const clockExpire = () => {
  clockLeft = 0;
  clockArmed = false;
};
function clock(): number {
  if (clockLeft > 0) {
    clockLeft--;
    return clockMs;
  }
  clockMs = Date.now();
  clockLeft = 255;
  if (!clockArmed) {
    clockArmed = true;
    queueMicrotask(clockExpire);
  }
  return clockMs;
}

function hexBytes(s: string): Uint8Array | undefined {
  if (s.length % 2 !== 0 || !/^[0-9a-f]*$/i.test(s)) return undefined;
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function positive(name: string, v: number | undefined, dflt: number, max = Number.MAX_SAFE_INTEGER): number {
  if (v === undefined) return dflt;
  if (!Number.isInteger(v) || v < 1 || v > max) {
    throw new EdgetallyError("invalid_config", `edgetally: ${name} must be a whole number in 1..${max}, got ${v}`);
  }
  return v;
}

// The JavaScript fast path sums q = v·10⁹ (a float product) in a float `sum` kept below 2⁵¹
// in magnitude. When q is an integer and |sum + q| < 2⁵¹, then |q| < 2⁵², where ulp(q) ≤ ½,
// so the exact product lies within ¼ of the integer q: q is exactly v's round-half-even
// quantisation (edgetally_core::value::quantize_fast argues the same up to 2⁵¹), and
// sum + q, a sum of integers below 2⁵³, is computed exactly. NaN fails the integer test and
// ±Infinity the bound. Everything else takes the wasm path.
const LIM = 2 ** 51;

/**
 * An interned (category, entity): the fast way to record in hot loops. A handle aggregates
 * in JavaScript while its bucket stays open (count, exact sum in nano-units, min, max) and
 * hands the summary to the wasm producer at each flush tick, so most records never leave
 * JavaScript; values the fast path cannot sum exactly go through wasm one by one.
 */
export class Handle {
  /** @internal */ readonly p: Producer;
  /** The handle's number (for `recordMany` with a `Uint32Array` of handles). */
  readonly id: number;
  /** @internal */ readonly ids: Uint32Array;
  /** @internal The open bucket, [start, end) in ms; empty when start > end. */
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
  constructor(p: Producer, id: number) {
    this.p = p;
    this.id = id;
    this.ids = Uint32Array.of(id);
  }
  /** Records one value (now, or at `ts_ms`). Throws `EdgetallyError` for an invalid value or time (also counted in `stats().invalid`). */
  record(value: number, ts_ms?: number): void {
    const ts = ts_ms === undefined ? clock() : ts_ms;
    const q = value * 1e9;
    const s = this.sum + q;
    if (ts >= this.start && ts < this.end && Math.round(q) === q && s < LIM && s > -LIM) {
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

interface Waiter {
  token: number;
  resolve: () => void;
  reject: (e: unknown) => void;
  timer?: ReturnType<typeof setTimeout>;
}

type Entity = { none: Handle | undefined; byEntity: Map<string, Handle> };

/** A producer: records events, aggregates them, ships signed batches until acked. */
export class Producer {
  #core: Core | undefined;
  readonly #urls: string[];
  readonly #fetch: typeof fetch;
  readonly #timeoutMs: number;
  #credential: string | undefined;
  readonly #names = new Map<string, Entity>();
  readonly #bucketMs: number;
  /** Handles with an open bucket in JavaScript. */
  #open: Handle[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;
  #timerDue = Infinity;
  #waiters: Waiter[] = [];
  #sending = 0;
  /** Per endpoint: its WebTransport link (none: HTTP only). */
  readonly #links: (WebTransportLink | undefined)[];
  readonly #transport: Transport;
  readonly #sent = { webtransport: 0, http: 0, keepalive: 0 };
  /** The page is hidden or being left: batches go out as `fetch(…, {keepalive: true})`, which outlives the page. */
  #leaving = false;
  #unlisten: (() => void) | undefined;
  /** @internal */ armed = false;

  private constructor(
    core: Core,
    urls: string[],
    f: typeof fetch,
    timeoutMs: number,
    bucketMs: number,
    links: (WebTransportLink | undefined)[],
    transport: Transport,
  ) {
    this.#core = core;
    this.#bucketMs = bucketMs;
    this.#urls = urls;
    this.#fetch = f;
    this.#timeoutMs = timeoutMs;
    this.#links = links;
    this.#transport = transport;
  }

  /** Creates a producer with a fresh signing key and epoch from the platform's secure random source. */
  static async create(options: ProducerOptions): Promise<Producer> {
    await ready();
    const o = options ?? ({} as ProducerOptions);
    if (!Array.isArray(o.endpoints) || o.endpoints.length === 0) {
      throw new EdgetallyError("invalid_config", "edgetally: endpoints must be a non-empty array of URLs");
    }
    const urls = o.endpoints.map((e) => {
      let u: URL;
      try {
        u = new URL(e);
      } catch {
        throw new EdgetallyError("invalid_config", `edgetally: endpoint is not a URL: ${e}`);
      }
      if (u.protocol !== "http:" && u.protocol !== "https:") {
        throw new EdgetallyError("invalid_config", `edgetally: endpoint must be http(s):// (got ${u.protocol})`);
      }
      return new URL("v1/batches", u.href.endsWith("/") ? u.href : u.href + "/").href;
    });
    const transport = o.transport ?? "auto";
    if (transport !== "auto" && transport !== "http" && transport !== "webtransport") {
      throw new EdgetallyError("unsupported_transport", `edgetally: transport must be "auto", "http" or "webtransport", got ${String(transport)}`);
    }
    if (transport === "webtransport" && !webTransportCtor()) {
      throw new EdgetallyError("unsupported_transport", "edgetally: this runtime has no WebTransport");
    }
    for (const h of o.serverCertificateHashes ?? []) {
      if (!/^[0-9a-f]{64}$/i.test(h)) {
        throw new EdgetallyError("invalid_config", `edgetally: serverCertificateHashes holds SHA-256 hex digests, got ${h}`);
      }
    }
    const f = o.fetch ?? globalThis.fetch;
    if (typeof f !== "function") throw new EdgetallyError("invalid_config", "edgetally: no fetch in this runtime; pass options.fetch");
    const seed = new Uint8Array(48);
    globalThis.crypto.getRandomValues(seed);
    let core: Core;
    const bucketMs = positive("bucketMs", o.bucketMs, 1000, 86_400_000);
    try {
      core = new Core(
        seed,
        o.endpoints.slice(),
        bucketMs,
        positive("flushIntervalMs", o.flushIntervalMs, 1000),
        positive("maxBatchSummaries", o.maxBatchSummaries, 2000, 10_000),
        positive("maxBatchBytes", o.maxBatchBytes, 256 << 10, 1 << 20),
        positive("maxOutboxBytes", o.maxOutboxBytes, 8 << 20),
        positive("maxInFlight", o.maxInFlight, 16, 1024),
      );
    } catch (e) {
      if (typeof e === "number") throw new EdgetallyError(e, `edgetally: invalid configuration (${reasonName(e)})`);
      throw e;
    } finally {
      seed.fill(0);
    }
    const fetch_ = f.bind(globalThis);
    const links = o.endpoints.map((e) =>
      transport !== "http" && webTransportCtor() ? new WebTransportLink(e, fetch_, o.serverCertificateHashes) : undefined,
    );
    const p = new Producer(core, urls, fetch_, positive("requestTimeoutMs", o.requestTimeoutMs, 10_000), bucketMs, links, transport);
    p.#listen();
    return p;
  }

  /** @internal */
  core(): Core {
    const c = this.#core;
    if (!c) throw new EdgetallyError("closed", "edgetally: the producer is closed");
    return c;
  }

  /** The producer's ed25519 public key, hex. */
  /**
   * Sets the enrolment credential (hex) for mergers whose `producer_policy` is `"enrolled"`:
   * your site's backend issues it for this producer's `producerKey` (`edgetally enroll`, or
   * any ed25519 library: docs/PROTOCOL.md §8). It is sent with every batch. Set it before
   * recording: a batch refused as `not_admitted` is dropped like any refused batch.
   */
  setCredential(credential: string): void {
    if (!/^ec01[0-9a-f]{272}$/i.test(credential)) {
      throw new EdgetallyError("invalid_config", "edgetally: a credential is 138 bytes in hex, starting ec01");
    }
    this.#credential = credential;
  }

  get producerKey(): string {
    return this.core().producerKey;
  }

  /** This instance's epoch (a u64, as a decimal string). */
  get epoch(): string {
    return this.core().epoch;
  }

  /** Records one event. Throws `EdgetallyError` for an invalid one (also counted in `stats().invalid`). */
  record(category: string, value: number, options?: RecordOptions): void {
    const entity = options?.entity;
    const h = this.#known(category, entity);
    if (h !== undefined) {
      h.record(value, options?.ts_ms);
      return;
    }
    // First use of this name: wasm validates and interns it (and counts a refusal).
    const core = this.core();
    const now = clock();
    const t = wasmTs(options?.ts_ms, now);
    const got = core.recordNamed(now, category, entity, value, t);
    if (!this.armed) this.arm();
    if (got < 0) throw new EdgetallyError(-got);
    this.#opened(this.#remember(category, entity, got), t);
  }

  /** The handle already made for (category, entity), if any. */
  #known(category: string, entity: string | undefined): Handle | undefined {
    const slot = this.#names.get(category);
    return slot === undefined ? undefined : entity === undefined ? slot.none : slot.byEntity.get(entity);
  }

  #remember(category: string, entity: string | undefined, id: number): Handle {
    const known = this.#known(category, entity);
    if (known) return known;
    let slot = this.#names.get(category);
    if (!slot) {
      slot = { none: undefined, byEntity: new Map() };
      this.#names.set(category, slot);
    }
    const h = new Handle(this, id);
    if (entity === undefined) slot.none = h;
    else slot.byEntity.set(entity, h);
    return h;
  }

  /** A value went into the wasm bucket of `ts`: later ones in that bucket can stay in JavaScript. */
  #opened(h: Handle, ts: number): void {
    const start = Math.floor(ts / this.#bucketMs) * this.#bucketMs;
    if (h.start !== start) {
      this.#drain(h, Date.now());
      h.start = start;
      h.end = start + this.#bucketMs;
    }
    if (!h.listed) {
      h.listed = true;
      this.#open.push(h);
    }
  }

  /** Hands what `h` aggregated in JavaScript to the wasm producer. */
  #drain(h: Handle, now: number): void {
    if (h.count === 0) return;
    const core = this.#core;
    if (core) core.recordSummary(now, h.id, h.start, h.count, h.sum, h.min, h.max);
    h.count = 0;
    h.sum = 0;
    h.min = Infinity;
    h.max = -Infinity;
  }

  /** Drains every handle and closes their JavaScript buckets (the next record re-opens them through wasm, which re-arms the flush timer). */
  #drainAll(now: number): void {
    for (const h of this.#open) {
      this.#drain(h, now);
      h.start = Infinity;
      h.end = -Infinity;
      h.listed = false;
    }
    this.#open = [];
  }

  /** @internal A record the handle's JavaScript fast path could not take. */
  recordSlow(h: Handle, value: number, ts_ms: number | undefined): void {
    const core = this.core();
    const now = clock();
    const t = wasmTs(ts_ms, now);
    this.#drain(h, now);
    const r = core.record(now, h.id, value, t);
    if (!this.armed) this.arm();
    if (r !== 0) throw new EdgetallyError(r);
    this.#opened(h, t);
  }

  /** The handle of (category, entity). Throws `EdgetallyError` for an invalid name. */
  handle(category: string, entity?: string): Handle {
    const known = this.#known(category, entity);
    if (known) return known;
    const id = this.core().handle(category, entity);
    if (id < 0) throw new EdgetallyError(-id);
    return this.#remember(category, entity, id);
  }

  /**
   * Records many values at once: `values[i]` for `target` (one handle) or for handle id
   * `target[i]`, at `tsMs[i]` (or now). Returns how many were accepted; the others are
   * counted in `stats().invalid`.
   */
  recordMany(target: Handle | Uint32Array, values: Float64Array | number[], tsMs?: Float64Array | number[]): number {
    const core = this.core();
    const vs = values instanceof Float64Array ? values : Float64Array.from(values);
    if (target instanceof Handle && tsMs === undefined) return this.#bulk(core, target, vs);
    const hs = target instanceof Handle ? target.ids : target;
    const ts = tsMs === undefined ? EMPTY : tsMs instanceof Float64Array ? tsMs : Float64Array.from(tsMs);
    const n = core.recordMany(Date.now(), hs, vs, ts);
    if (!this.armed) this.arm();
    return n;
  }

  /** One handle, now: summed in JavaScript like `Handle.record`, exceptions go through wasm. */
  #bulk(core: Core, h: Handle, vs: Float64Array): number {
    const now = Date.now();
    const n = vs.length;
    let ok = 0;
    let i = 0;
    while (i < n) {
      if (!(now >= h.start && now < h.end)) {
        // Open the bucket through wasm with this value.
        if (core.record(now, h.id, vs[i], now) === 0) {
          ok++;
          this.#opened(h, now);
        }
        i++;
        continue;
      }
      let count = h.count;
      let sum = h.sum;
      let min = h.min;
      let max = h.max;
      const before = count;
      for (; i < n; i++) {
        const v = vs[i];
        const q = v * 1e9;
        const s = sum + q;
        if (Math.round(q) !== q || !(s < LIM && s > -LIM)) break;
        count++;
        sum = s;
        if (v < min) min = v + 0;
        if (v > max) max = v + 0;
      }
      h.count = count;
      h.sum = sum;
      h.min = min;
      h.max = max;
      ok += count - before;
      if (i < n) {
        // Not summable here (or the sum is full): drain, then this value alone through wasm.
        this.#drain(h, now);
        if (core.record(now, h.id, vs[i], now) === 0) ok++;
        i++;
      }
    }
    if (!this.armed) this.arm();
    return ok;
  }

  /** Resolves once everything recorded before the call is answered (acked, or rejected/dropped and counted). */
  flush(options?: { timeoutMs?: number }): Promise<void> {
    const core = this.core();
    this.#drainAll(Date.now());
    const token = core.flush(Date.now());
    this.#pump();
    if (core.flushed(token)) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const w: Waiter = { token, resolve, reject };
      const t = options?.timeoutMs;
      if (t !== undefined) {
        w.timer = setTimeout(() => {
          this.#waiters = this.#waiters.filter((x) => x !== w);
          this.#hold();
          reject(new EdgetallyError("timeout", `edgetally: flush not answered within ${t} ms`));
        }, t);
      }
      this.#waiters.push(w);
      this.#hold();
    });
  }

  /**
   * In a browser page: when the page is hidden (`visibilitychange`) or left (`pagehide`),
   * seal what is pending and send everything due with `fetch(…, {keepalive: true})`, which
   * the browser completes after the page is gone (bodies up to 64 KiB in flight). Sessions
   * and streams die with the page; keepalive requests do not.
   */
  #listen(): void {
    const g = globalThis as {
      addEventListener?: (t: string, f: () => void) => void;
      removeEventListener?: (t: string, f: () => void) => void;
      document?: { visibilityState?: string; addEventListener?: (t: string, f: () => void) => void; removeEventListener?: (t: string, f: () => void) => void };
    };
    const doc = g.document;
    if (!doc || typeof g.addEventListener !== "function" || typeof doc.addEventListener !== "function") return;
    const leave = () => {
      this.#leaving = true;
      this.#sendNow();
    };
    const visibility = () => {
      if (doc.visibilityState === "hidden") leave();
      else this.#leaving = false;
    };
    const back = () => {
      this.#leaving = false;
    };
    g.addEventListener("pagehide", leave);
    g.addEventListener("pageshow", back);
    doc.addEventListener("visibilitychange", visibility);
    this.#unlisten = () => {
      g.removeEventListener?.("pagehide", leave);
      g.removeEventListener?.("pageshow", back);
      doc.removeEventListener?.("visibilitychange", visibility);
    };
  }

  /** Seals what is pending and sends every batch that is due, now. */
  #sendNow(): void {
    const core = this.#core;
    if (!core) return;
    this.#drainAll(Date.now());
    core.flush(Date.now());
    this.#pump();
  }

  /** The counters. */
  stats(): Stats {
    const core = this.core();
    this.#drainAll(Date.now());
    return { ...(core.stats() as Omit<Stats, "sentByTransport">), sentByTransport: { ...this.#sent } };
  }

  /** Flushes (bounded by `timeoutMs` if given), then releases the producer; unacknowledged batches are lost (see `stats()` first). */
  async close(options?: { timeoutMs?: number }): Promise<void> {
    if (!this.#core) return;
    try {
      await this.flush(options);
    } finally {
      clearTimeout(this.#timer);
      this.#timer = undefined;
      const core = this.#core;
      this.#core = undefined;
      core?.free();
      for (const l of this.#links) l?.close();
      this.#unlisten?.();
      for (const w of this.#waiters) w.reject(new EdgetallyError("closed", "edgetally: the producer is closed"));
      this.#waiters = [];
    }
  }

  /** @internal Makes sure a timer will seal and send what was just recorded. */
  arm(): void {
    this.armed = true;
    this.#schedule(Date.now());
  }

  #schedule(now: number): void {
    const core = this.#core;
    if (!core) return;
    const due = core.pollTimeout();
    if (Number.isNaN(due)) {
      this.armed = this.#timer !== undefined;
      return;
    }
    if (this.#timer !== undefined && this.#timerDue <= due) return;
    clearTimeout(this.#timer);
    this.#timerDue = due;
    const delay = Math.min(Math.max(0, due - now), 2 ** 31 - 1);
    const t = setTimeout(() => {
      this.#timer = undefined;
      this.#timerDue = Infinity;
      this.armed = false;
      this.#pump();
    }, delay);
    this.#timer = t;
    this.armed = true;
    this.#hold();
  }

  /**
   * Node: the send/retry timer keeps the process alive exactly while a `flush()` (or
   * `close()`) waits — so `await producer.flush()` at the end of a script delivers, through
   * retries and a merger that comes up late — and not otherwise, so a producer alone never
   * holds a process open.
   */
  #hold(): void {
    const t = this.#timer as { ref?: () => void; unref?: () => void } | undefined;
    if (this.#waiters.length > 0) t?.ref?.();
    else t?.unref?.();
  }

  #pump(): void {
    const core = this.#core;
    if (!core) return;
    const now = Date.now();
    this.#drainAll(now);
    for (;;) {
      const t = core.pollTransmit(now);
      if (t === undefined) break;
      const seq = t.seq;
      const endpoint = t.endpoint;
      const bytes = t.bytes as Uint8Array<ArrayBuffer>;
      t.free();
      void this.#send(seq, endpoint, bytes);
    }
    this.#schedule(now);
  }

  async #send(seq: number, endpoint: number, bytes: Uint8Array<ArrayBuffer>): Promise<void> {
    this.#sending++;
    let frame: Uint8Array | undefined;
    try {
      const link = this.#links[endpoint];
      // A credential rides in an HTTP header; WebTransport would need a stream of its own.
      // A page being left sends with keepalive fetch, which outlives it.
      if (link && this.#credential === undefined && !this.#leaving) {
        this.#sent.webtransport++;
        try {
          frame = await this.#bounded(link.send(bytes));
        } catch {
          frame = undefined;
          if (this.#transport === "auto") {
            // This merger's WebTransport does not work from here: HTTP from now on.
            this.#links[endpoint] = undefined;
            link.close();
            this.#sent.http++;
            frame = await this.#post(endpoint, bytes);
          }
        }
      } else {
        this.#sent.http++;
        if (this.#leaving) this.#sent.keepalive++;
        frame = await this.#post(endpoint, bytes);
      }
    } finally {
      this.#sending--;
    }
    const core = this.#core;
    if (!core) return;
    const now = Date.now();
    if (!frame || !core.handleReply(now, seq, frame)) core.transportError(now, seq, endpoint);
    this.#settle(core);
    this.#pump();
  }

  /** `p`, or a rejection after the request timeout. */
  #bounded<T>(p: Promise<T>): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const t = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error("timeout")), this.#timeoutMs);
    });
    return Promise.race([p, t]).finally(() => clearTimeout(timer));
  }

  /** One batch over HTTP: the reply frame, or undefined on a transport failure. */
  async #post(endpoint: number, bytes: Uint8Array<ArrayBuffer>): Promise<Uint8Array | undefined> {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), this.#timeoutMs);
    try {
      const res = await this.#fetch(this.#urls[endpoint] ?? "", {
        method: "POST",
        body: bytes,
        headers: this.#credential === undefined
          ? { "content-type": "application/octet-stream" }
          : { "content-type": "application/octet-stream", "edgetally-credential": this.#credential },
        signal: ctrl.signal,
        keepalive: this.#leaving && bytes.length <= 64 << 10,
      });
      const text = await res.text();
      if (res.status === 200 || res.status === 422 || res.status === 503) {
        const reply = JSON.parse(text) as { frame?: unknown };
        if (typeof reply.frame === "string") return hexBytes(reply.frame);
      }
      return undefined;
    } catch {
      return undefined;
    } finally {
      clearTimeout(timer);
    }
  }

  #settle(core: Core): void {
    if (this.#waiters.length === 0) return;
    const left: Waiter[] = [];
    for (const w of this.#waiters) {
      if (core.flushed(w.token)) {
        clearTimeout(w.timer);
        w.resolve();
      } else left.push(w);
    }
    this.#waiters = left;
    this.#hold();
  }
}

const EMPTY = new Float64Array(0);

/** The timestamp to hand to wasm: now when absent; a non-finite one stays invalid (wasm reads NaN as "now"). */
function wasmTs(ts: number | undefined, now: number): number {
  if (ts === undefined) return now;
  return Number.isFinite(ts) ? ts : Infinity;
}
