// The edgetally producer SDK: the TypeScript API over the wasm build of the sans-IO producer
// (crates/edgetally-wasm). The wasm side owns the rules — aggregation, bucket bounds,
// sealing, signing, the outbox and its schedule, the defaults; this side owns the clock, the
// timers, the transports (transport.ts, webtransport.ts), browser storage (store.ts) and
// the page and process lifecycle.

import { Core, defaults as wasmDefaults } from "../pkg/edgetally_wasm.js";
import { clock } from "./clock.js";
import { EdgetallyError } from "./errors.js";
import { Handle, LIM, type HandleOwner } from "./handle.js";
import { Signer } from "./signer.js";
import { Store, coalesce, isQuotaError, type StoredOp } from "./store.js";
import { BeaconTransport, HttpTransport, KEEPALIVE_BUDGET, type BatchTransport } from "./transport.js";
import { ready } from "./wasm.js";
import { WebTransportLink, webTransportCtor } from "./webtransport.js";

export { EdgetallyError } from "./errors.js";
export { Handle } from "./handle.js";
export type { BatchTransport, SendOptions, TransportKind } from "./transport.js";
export { setWasmLoader } from "./wasm.js";

/**
 * How batches travel. `"auto"` (default): WebTransport where the runtime has it (browsers),
 * falling back to HTTP for a merger whose WebTransport session fails (tried again a minute
 * later); HTTP elsewhere. `"webtransport"`: WebTransport only. `"http"`: `fetch` only.
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
  /** Batches sent and not yet answered, at most. Default 64. */
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
  /**
   * Your own way to a merger, in place of the built-in ones: called once per endpoint, it
   * returns the `BatchTransport` every batch for that endpoint goes through (also while a
   * page is being left). Its `send` resolves to the merger's bare reply (docs/PROTOCOL.md §5;
   * `POST /v1/batches` answers it in hex in `frame`) and rejects on a transport failure.
   * `transport` and `serverCertificateHashes` are then ignored, and an enrolment
   * credential (`setCredential`) is yours to send.
   */
  transports?: (endpoint: string) => BatchTransport;
  /**
   * Keep the producer key and the outbox in IndexedDB (browsers): batches not yet acked when
   * the page goes — offline, a merger down, a tab closed — are resent by the next page of the
   * origin (or by another open tab). Each page sends as its own epoch. `true` by default where
   * IndexedDB and Web Locks exist (browsers), else `false`; a string names the database
   * (default `"edgetally"`). Storage failures never make `record` throw: they are counted in
   * `stats().storeErrors`, and a full quota drops the oldest waiting batches (`stats().dropped`).
   */
  persist?: boolean | string;
  /** @internal How often a persisting page looks for closed pages' batches to adopt. Default 30000. */
  adoptIntervalMs?: number;
  /**
   * Categories whose values also go into a quantile sketch (1 % relative accuracy), for
   * `quantiles=` in queries; `"*"` names every category. Default none. Values of these
   * categories each go through wasm (no JavaScript summing).
   */
  quantileCategories?: string[];
  /** Precision (4–16) of the distinct-count sketches subjects go into. Default 14 (0.81 % standard error). */
  distinctPrecision?: number;
  /**
   * The site secret keying the subject hash (SipHash-2-4), 32 hex digits: without it a
   * subject hashes alike everywhere. Every producer and merger (`subject_key`) of a site must
   * use the same; changing it starts a new space (a union across the change counts a subject twice).
   */
  subjectKey?: string;
}

export interface RecordOptions {
  /** The entity (device, user, …); none by default. */
  entity?: string;
  /** Event time in ms since the Unix epoch; now by default. */
  ts_ms?: number;
  /**
   * Who did it (a user, device or session id, 1–200 bytes), for distinct counts: only its
   * 64-bit hash leaves the producer, into the bucket's HyperLogLog.
   */
  subject?: string;
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
  /**
   * Batches sent (attempts, resends included) by transport; `keepalive`: of the HTTP ones,
   * those sent while the page was hidden or being left; `beacon`: handed to `sendBeacon`
   * (no reply: they stay stored until a later send is acked).
   */
  sentByTransport: { webtransport: number; http: number; keepalive: number; beacon: number; custom: number };
  /** Batches of this producer held in IndexedDB now (0 without `persist`). */
  stored: number;
  /** IndexedDB operations that failed (other than quota, which drops and counts). */
  storeErrors: number;
  /** Closed pages' batches this page took over and resent. */
  adopted: { epochs: number; batches: number; acked: number; ackedRecords: number; rejected: number; dropped: number };
}

/** The producer's defaults, as the wasm core defines them. */
export interface Defaults {
  bucketMs: number;
  flushIntervalMs: number;
  maxBatchSummaries: number;
  maxBatchBytes: number;
  maxOutboxBytes: number;
  maxInFlight: number;
  /** The merger's default limit of summaries per batch. */
  maxSummariesLimit: number;
  /** The merger's default limit of bytes per batch. */
  maxPayloadBytes: number;
  /** The default precision of distinct-count sketches. */
  distinctPrecision: number;
}

/** The defaults (from the wasm core; the same as the Rust SDK's). Resolves once the module is loaded. */
export async function defaults(): Promise<Defaults> {
  await ready();
  return wasmDefaults() as Defaults;
}

interface Waiter {
  token: number;
  resolve: () => void;
  reject: (e: unknown) => void;
  timer?: ReturnType<typeof setTimeout>;
}

/** One epoch's outbox being sent: the producer's own, or one adopted from a closed page. */
interface Lane {
  core: Core;
  epoch: string;
  own: boolean;
  /** Storage: ops not yet written, a write running, the seqs stored. */
  ops: StoredOp[];
  writing: Promise<void> | undefined;
  stored: Set<number>;
  /** Batches to store whose IndexedDB write has not completed: spilled to localStorage when the page is left. */
  unstored: Map<number, Uint8Array>;
  /** Adopted lanes: resolves the adoption (releasing the closed page's lock) once drained. */
  finish?: () => void;
}

type Entity = { none: Handle | undefined; byEntity: Map<string, Handle> };

/** Batch size bound while the page is being left: within the keepalive budget, with room for headers. */
const LEAVING_BATCH_BYTES = 60 << 10;
/** The bound on each of `recordMany`'s two running sums. */
const HALF = LIM / 2;
/** A merger whose WebTransport failed is tried over WebTransport again after this long. */
const WEBTRANSPORT_RETRY_MS = 60_000;
/** A beacon'd batch is sent again (and acked as a duplicate) after this long if the page lives on. */
const BEACON_RESEND_MS = 10_000;
/** Whether a page being left can use keepalive fetches (their replies are read if it lives on) before beacons. */
const KEEPALIVE = HttpTransport.keepalive();

function positive(name: string, v: number | undefined, dflt: number, max = Number.MAX_SAFE_INTEGER): number {
  if (v === undefined) return dflt;
  if (!Number.isInteger(v) || v < 1 || v > max) {
    throw new EdgetallyError("invalid_config", `edgetally: ${name} must be a whole number in 1..${max}, got ${v}`);
  }
  return v;
}

function epochBytes(epoch: string): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(epoch), true);
  return b;
}

/** Everything `Core`'s constructor takes but the seed and next seq. */
type CoreConfig = { endpoints: string[] } & Omit<Defaults, "maxSummariesLimit" | "maxPayloadBytes" | "distinctPrecision">;

/** The sketch settings, checked: the quantile categories, and what `Core.setDistinct` takes. */
function sketchSettings(o: ProducerOptions, d: Defaults): [string[], number, Uint8Array] {
  const cats = o.quantileCategories ?? [];
  const p = o.distinctPrecision ?? d.distinctPrecision;
  const k = o.subjectKey;
  const bad = !Array.isArray(cats) || cats.some((c) => typeof c !== "string" || !c) ? "quantileCategories must be category names"
    : !Number.isInteger(p) || p < 4 || p > 16 ? "distinctPrecision must be in 4..16"
    : k !== undefined && !/^[0-9a-f]{32}$/i.test(String(k)) ? "subjectKey must be 32 hex digits" : "";
  if (bad) throw new EdgetallyError("invalid_config", `edgetally: ${bad}`);
  const key = new Uint8Array(k === undefined ? 0 : 16);
  for (let i = 0; i < key.length; i++) key[i] = parseInt(k!.slice(2 * i, 2 * i + 2), 16);
  return [cats.slice(), p, key];
}

/** A core for public key `key` (WebCrypto signs what it seals) and `epoch`. */
function makeCore(key: Uint8Array, epoch: Uint8Array, c: CoreConfig, nextSeq: number, persist: boolean): Core {
  const seed = new Uint8Array(48);
  seed.set(key, 0);
  seed.set(epoch, 32);
  globalThis.crypto.getRandomValues(seed.subarray(40));
  try {
    return new Core(
      seed, c.endpoints.join("\n"), c.bucketMs, c.flushIntervalMs, c.maxBatchSummaries, c.maxBatchBytes,
      c.maxOutboxBytes, c.maxInFlight, nextSeq, persist,
    );
  } catch (e) {
    if (typeof e === "number") throw new EdgetallyError(e, `edgetally: invalid configuration (${new EdgetallyError(e).code})`);
    throw e;
  } finally {
    seed.fill(0);
  }
}

/** A producer: records events, aggregates them, ships signed batches until acked. */
export class Producer implements HandleOwner {
  #core: Core | undefined;
  /** The own lane first, then adopted ones. */
  #lanes: Lane[];
  readonly #config: CoreConfig;
  readonly #signer: Signer;
  readonly #names = new Map<string, Entity>();
  /** The categories that keep quantiles (`ProducerOptions.quantileCategories`). */
  #quantiles: string[] = [];
  /** Handles with an open bucket in JavaScript. */
  #open: Handle[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;
  #timerDue = Infinity;
  #waiters: Waiter[] = [];
  /** Per endpoint: HTTP (always), WebTransport (when chosen and available), beacon (browsers). */
  readonly #http: HttpTransport[];
  readonly #wt: (WebTransportLink | undefined)[];
  readonly #wtDownUntil: number[];
  readonly #beacon: (BeaconTransport | undefined)[];
  /** Per endpoint: the application's own transport (`ProducerOptions.transports`), if given. */
  #custom: BatchTransport[] | undefined;
  readonly #transport: Transport;
  readonly #timeoutMs: number;
  readonly #sent = { webtransport: 0, http: 0, keepalive: 0, beacon: 0, custom: 0 };
  /** Keepalive request bytes in flight (the browser's budget is 64 KiB). */
  #keepaliveBytes = 0;
  /** The page is hidden or being left: batches go out with keepalive fetch or as beacons, which outlive the page. */
  #leaving = false;
  /** The browser says it is offline: seal into the stored outbox, send nothing. */
  #offline = false;
  #credential: string | undefined;
  readonly #store: Store | undefined;
  #release: (() => void) | undefined;
  #storeErrors = 0;
  #adopting = new Set<string>();
  readonly #adopted = { epochs: 0, batches: 0, acked: 0, ackedRecords: 0, rejected: 0, dropped: 0 };
  #scanTimer: ReturnType<typeof setInterval> | undefined;
  #unlisten: (() => void) | undefined;
  /** @internal */ armed = false;

  private constructor(
    core: Core,
    epoch: string,
    signer: Signer,
    config: CoreConfig,
    http: HttpTransport[],
    wt: (WebTransportLink | undefined)[],
    transport: Transport,
    store: Store | undefined,
    timeoutMs: number,
  ) {
    this.#timeoutMs = timeoutMs;
    this.#core = core;
    this.#signer = signer;
    this.#config = config;
    this.#lanes = [{ core, epoch, own: true, ops: [], writing: undefined, stored: new Set(), unstored: new Map() }];
    this.#http = http;
    this.#wt = wt;
    this.#wtDownUntil = wt.map(() => 0);
    this.#beacon = http.map((h) => (BeaconTransport.available() ? new BeaconTransport(h.url) : undefined));
    this.#transport = transport;
    this.#store = store;
  }

  /** Creates a producer: a fresh epoch, and the origin's stored key with `persist`, else a fresh key, from the platform's secure random source. */
  static async create(options: ProducerOptions): Promise<Producer> {
    await ready();
    const d = wasmDefaults() as Defaults;
    const o = options ?? ({} as ProducerOptions);
    if (!Array.isArray(o.endpoints) || o.endpoints.length === 0) {
      throw new EdgetallyError("invalid_config", "edgetally: endpoints must be a non-empty array of URLs");
    }
    for (const e of o.endpoints) urlOf(e);
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
    const config: CoreConfig = {
      endpoints: o.endpoints.slice(),
      bucketMs: positive("bucketMs", o.bucketMs, d.bucketMs, 86_400_000),
      flushIntervalMs: positive("flushIntervalMs", o.flushIntervalMs, d.flushIntervalMs),
      maxBatchSummaries: positive("maxBatchSummaries", o.maxBatchSummaries, d.maxBatchSummaries, d.maxSummariesLimit),
      maxBatchBytes: positive("maxBatchBytes", o.maxBatchBytes, d.maxBatchBytes, d.maxPayloadBytes),
      maxOutboxBytes: positive("maxOutboxBytes", o.maxOutboxBytes, d.maxOutboxBytes),
      maxInFlight: positive("maxInFlight", o.maxInFlight, d.maxInFlight, 1024),
    };
    const sketches = sketchSettings(o, d);
    const timeoutMs = positive("requestTimeoutMs", o.requestTimeoutMs, 10_000);
    const adoptMs = positive("adoptIntervalMs", o.adoptIntervalMs, 30_000);
    if (o.persist !== undefined && typeof o.persist !== "boolean" && (typeof o.persist !== "string" || o.persist === "")) {
      throw new EdgetallyError("invalid_config", "edgetally: persist is a boolean or a database name");
    }
    const persist = o.persist ?? Store.available();
    if (persist !== false && !Store.available()) {
      throw new EdgetallyError("invalid_config", "edgetally: persist needs IndexedDB and Web Locks (browsers)");
    }

    const fresh = new Uint8Array(32);
    globalThis.crypto.getRandomValues(fresh);
    const epoch = new Uint8Array(8);
    globalThis.crypto.getRandomValues(epoch);
    let store: Store | undefined;
    let key: Uint8Array = fresh;
    let storeErrors = 0;
    if (persist !== false) {
      try {
        store = await Store.open(typeof persist === "string" ? persist : "edgetally");
        key = await store.key(fresh);
      } catch {
        // Private modes and blocked storage: an in-memory producer, counted.
        store = undefined;
        storeErrors++;
      }
    }
    const signer = await Signer.fromSeed(key).catch((e: unknown) => {
      store?.close();
      throw e;
    });
    key.fill(0);
    const core = makeCore(signer.publicKey, epoch, config, 0, store !== undefined);
    core.setDistinct(sketches[1], sketches[2]);
    const epochStr = core.epoch;
    let release: (() => void) | undefined;
    if (store) {
      // Hold this epoch's lock before its first record is stored: no page may adopt a live epoch.
      release = await store.hold(epochStr);
    }
    const fetch_ = f.bind(globalThis);
    const http = config.endpoints.map((e) => new HttpTransport(new URL("v1/batches", urlOf(e)).href, fetch_));
    const wt = config.endpoints.map((e) =>
      transport !== "http" && webTransportCtor() ? new WebTransportLink(e, fetch_, o.serverCertificateHashes) : undefined,
    );
    const p = new Producer(core, epochStr, signer, config, http, wt, transport, store, timeoutMs);
    p.#custom = o.transports && config.endpoints.map(o.transports);
    p.#quantiles = sketches[0];
    p.#release = release;
    p.#storeErrors = storeErrors;
    p.#listen();
    if (store) {
      p.#persist(p.#lanes[0]);
      void p.#scan();
      p.#scanTimer = setInterval(() => void p.#scan(), adoptMs);
    }
    return p;
  }

  /** @internal */
  core(): Core {
    const c = this.#core;
    if (!c) throw new EdgetallyError("closed", "edgetally: the producer is closed");
    return c;
  }

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
    for (const h of this.#http) h.credential = credential;
  }

  /** The producer's ed25519 public key, hex. */
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
    if (h !== undefined && options?.subject === undefined) h.record(value, options?.ts_ms);
    else this.#recordNew(category, entity, value, options, h);
  }

  /** `record` of a subject, or of a name not seen yet (kept out of `record`, which stays small enough to inline). */
  #recordNew(category: string, entity: string | undefined, value: number, options: RecordOptions | undefined, h: Handle | undefined): void {
    if (options?.subject !== undefined) return this.recordSlow(h ?? this.handle(category, entity), value, options.ts_ms, options.subject);
    // First use of this name: wasm validates and interns it (and counts a refusal). A
    // quantile category's handle is marked before its first value.
    const core = this.core();
    if (this.#quantiles.some((c) => c === "*" || c === category)) {
      const id = core.handle(category, entity);
      if (id >= 0) return this.#remember(category, entity, id).record(value, options?.ts_ms);
    }
    const now = clock();
    const got = core.recordNamed(now, category, entity, value, wasmTs(options?.ts_ms, now));
    if (!this.armed) this.arm();
    if (got < 0) throw new EdgetallyError(-got);
    this.#opened(this.#remember(category, entity, got));
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
    if (this.#quantiles.some((c) => c === "*" || c === category)) {
      h.quantiles = true;
      this.core().keepQuantiles(id);
    }
    if (entity === undefined) slot.none = h;
    else slot.byEntity.set(entity, h);
    return h;
  }

  /** A value went into a wasm bucket of `h`: later ones in the bucket wasm has open (it says which) can stay in JavaScript — unless its category keeps quantiles (each value must reach the sketch). */
  #opened(h: Handle): void {
    this.#drain(h, Date.now());
    const b = h.quantiles ? [] : this.core().openBucket(h.id);
    h.start = b.length === 2 ? b[0] : Infinity;
    h.end = b.length === 2 ? b[1] : -Infinity;
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

  /** @internal A record the handle's JavaScript fast path could not take, or one with a subject (`Handle.record`'s third argument). */
  recordSlow(h: Handle, value: number, ts_ms: number | undefined, subject?: string): void {
    const core = this.core();
    const now = clock();
    this.#drain(h, now);
    const ts = wasmTs(ts_ms, now);
    const r = subject === undefined ? core.record(now, h.id, value, ts) : core.recordSubject(now, h.id, value, ts, String(subject));
    if (!this.armed) this.arm();
    if (r !== 0) throw new EdgetallyError(r);
    this.#opened(h);
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
        this.#drain(h, now);
        if (core.record(now, h.id, vs[i], now) === 0) {
          ok++;
          this.#opened(h);
        }
        i++;
        continue;
      }
      let min = h.min;
      let max = h.max;
      const from = i;
      // Two values a step, in two sums each kept below LIM/2 (so their total stays below
      // LIM, and each q below LIM: handle.ts's exactness argument holds): the float adds
      // no longer wait on each other, ~1.5× the rate of one sum. A pair that fails a test
      // is left to the one-sum loop below, then to wasm.
      let s0 = h.sum;
      let s1 = 0;
      for (const end = n - 1; i < end; i += 2) {
        const v0 = vs[i];
        const v1 = vs[i + 1];
        const q0 = v0 * 1e9;
        const q1 = v1 * 1e9;
        const t0 = s0 + q0;
        const t1 = s1 + q1;
        if (Math.floor(q0) !== q0 || Math.floor(q1) !== q1 || !(t0 < HALF && t0 > -HALF && t1 < HALF && t1 > -HALF)) break;
        s0 = t0;
        s1 = t1;
        // `+ 0` turns -0 into 0, as the wasm side does.
        min = v0 < min ? v0 + 0 : min;
        max = v0 > max ? v0 + 0 : max;
        min = v1 < min ? v1 + 0 : min;
        max = v1 > max ? v1 + 0 : max;
      }
      let sum = s0 + s1;
      for (; i < n; i++) {
        const v = vs[i];
        const q = v * 1e9;
        const s = sum + q;
        if (Math.floor(q) !== q || !(s < LIM && s > -LIM)) break;
        sum = s;
        min = v < min ? v + 0 : min;
        max = v > max ? v + 0 : max;
      }
      h.count += i - from;
      h.sum = sum;
      h.min = min;
      h.max = max;
      ok += i - from;
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

  /**
   * Resolves once everything recorded before the call is answered (acked, or rejected/dropped
   * and counted). In Node and Deno a pending `flush()` keeps the process alive until then (or
   * until `timeoutMs`, when it rejects with `timeout`).
   */
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
   * Browsers: when the page is hidden (`visibilitychange`) or left (`pagehide`), seal what is
   * pending into batches within the 64 KiB keepalive budget and send what is due with
   * `fetch(…, {keepalive: true})`, then `sendBeacon`; both outlive the page. What neither
   * takes stays stored (with `persist`: in IndexedDB, and in localStorage for what IndexedDB
   * has not yet committed) for the next page. `offline`/`online` pause and
   * resume sending.
   */
  #listen(): void {
    const g = globalThis as {
      addEventListener?: (t: string, f: () => void) => void;
      removeEventListener?: (t: string, f: () => void) => void;
      document?: { visibilityState?: string; addEventListener?: (t: string, f: () => void) => void; removeEventListener?: (t: string, f: () => void) => void };
      navigator?: { onLine?: boolean };
    };
    if (typeof g.addEventListener !== "function") return;
    const offline = () => {
      this.#offline = true;
    };
    const online = () => {
      this.#offline = false;
      const now = Date.now();
      for (const l of this.#lanes) l.core.wake(now);
      this.#pump();
      void this.#scan();
    };
    if (g.navigator?.onLine === false) this.#offline = true;
    g.addEventListener("offline", offline);
    g.addEventListener("online", online);
    const doc = g.document;
    const leave = () => {
      this.#leaving = true;
      const core = this.#core;
      if (!core) return;
      this.#drainAll(Date.now());
      core.sealWithin(Date.now(), LEAVING_BATCH_BYTES);
      this.#pump();
      // What IndexedDB has not yet taken may never reach it (Chromium does not commit a
      // write started while the page unloads): localStorage takes it synchronously.
      const own = this.#lanes[0];
      if (this.#store && own && !this.#store.spill(own.epoch, [...own.unstored])) this.#storeErrors++;
    };
    const visibility = () => {
      if (doc?.visibilityState === "hidden") leave();
      else this.#leaving = false;
    };
    const back = () => {
      this.#leaving = false;
    };
    if (doc && typeof doc.addEventListener === "function") {
      g.addEventListener("pagehide", leave);
      g.addEventListener("pageshow", back);
      doc.addEventListener("visibilitychange", visibility);
    }
    this.#unlisten = () => {
      g.removeEventListener?.("offline", offline);
      g.removeEventListener?.("online", online);
      g.removeEventListener?.("pagehide", leave);
      g.removeEventListener?.("pageshow", back);
      doc?.removeEventListener?.("visibilitychange", visibility);
    };
  }

  /** The counters. */
  stats(): Stats {
    const core = this.core();
    this.#drainAll(Date.now());
    const own = this.#lanes[0];
    const adopted = { ...this.#adopted };
    for (const l of this.#lanes.slice(1)) addAdopted(adopted, l.core);
    return {
      ...(core.stats() as Omit<Stats, "sentByTransport" | "stored" | "storeErrors" | "adopted">),
      sentByTransport: { ...this.#sent },
      stored: own.stored.size,
      storeErrors: this.#storeErrors,
      adopted,
    };
  }

  /**
   * Flushes (bounded by `timeoutMs` if given), then releases the producer. Without `persist`,
   * unacknowledged batches are lost (see `stats()` first); with it they stay stored and the
   * next page of the origin resends them.
   */
  async close(options?: { timeoutMs?: number }): Promise<void> {
    if (!this.#core) return;
    try {
      await this.flush(options);
    } finally {
      clearTimeout(this.#timer);
      this.#timer = undefined;
      clearInterval(this.#scanTimer);
      const core = this.#core;
      this.#core = undefined;
      const own = this.#lanes[0];
      const empty = core ? (core.stats() as { outboxBytes: number }).outboxBytes === 0 : true;
      await this.#settleStore(own);
      if (this.#store && empty) await this.#store.forget(own.epoch).catch(() => this.#storeErrors++);
      for (const l of this.#lanes) {
        l.finish?.();
        l.core.free();
      }
      this.#lanes = [];
      this.#release?.();
      this.#store?.close();
      for (const l of this.#wt) l?.close();
      for (const t of this.#custom ?? []) t.close();
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
    if (!this.#core) return;
    let due = NaN;
    for (const l of this.#lanes) {
      // Offline, only sealing is due (into the stored outbox); retries wait for `online`.
      const t = this.#offline ? (l.own ? l.core.pollSeal(now) : NaN) : l.core.pollTimeout();
      if (!Number.isNaN(t) && !(t >= due)) due = t;
    }
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
    if (!this.#core) return;
    const now = Date.now();
    this.#drainAll(now);
    for (const lane of this.#lanes) {
      // Seal what is due first, so a batch sealed now is handed to the signer in this same
      // pump (offline, only the own lane seals, into the stored outbox).
      if (lane.own || !this.#offline) lane.core.pollSeal(now);
      for (;;) {
        const r = lane.core.pollSign();
        if (r === undefined) break;
        const seq = r.seq;
        const message = r.bytes as Uint8Array<ArrayBuffer>;
        r.free();
        void this.#sign(lane, seq, message);
      }
      if (!this.#offline) {
        for (;;) {
          const t = lane.core.pollTransmit(now);
          if (t === undefined) break;
          const seq = t.seq;
          const endpoint = t.tag;
          const bytes = t.bytes as Uint8Array<ArrayBuffer>;
          t.free();
          void this.#send(lane, seq, endpoint, bytes);
        }
      }
      if (this.#store) this.#persist(lane);
    }
    this.#schedule(now);
  }

  /** Signs a batch sealed unsigned; once signed it is stored again and can be sent. */
  async #sign(lane: Lane, seq: number, message: Uint8Array<ArrayBuffer>): Promise<void> {
    let sig: Uint8Array | undefined;
    try {
      sig = await this.#signer.sign(message);
    } catch {
      // Handed out again by the next pump (a timer, a record, a reply).
    }
    if (!this.#lanes.includes(lane)) return;
    if (sig) lane.core.handleSignature(seq, sig);
    else lane.core.signFailed(seq);
    this.#pump();
  }

  /** The transport for one batch now, or none (it waits, stored, for a better moment). */
  #pick(endpoint: number, size: number, now: number): BatchTransport | undefined {
    const custom = this.#custom?.[endpoint];
    if (custom) return custom;
    if (this.#leaving) {
      // Only requests that outlive the page, within the browser's keepalive budget.
      if (KEEPALIVE && this.#keepaliveBytes + size <= KEEPALIVE_BUDGET) return this.#http[endpoint];
      if (this.#credential === undefined) return this.#beacon[endpoint];
      return undefined;
    }
    const wt = this.#wt[endpoint];
    // A credential rides in an HTTP header; WebTransport would need a stream of its own.
    if (wt && this.#credential === undefined && now >= this.#wtDownUntil[endpoint]) return wt;
    if (wt && this.#transport === "webtransport") return wt;
    return this.#http[endpoint];
  }

  async #send(lane: Lane, seq: number, endpoint: number, bytes: Uint8Array<ArrayBuffer>): Promise<void> {
    let t = this.#pick(endpoint, bytes.length, Date.now());
    if (!t) {
      lane.core.retryAfter(Date.now(), seq, 1000);
      return;
    }
    let frame: Uint8Array | undefined;
    let failed = false;
    const keepalive = this.#leaving && (t.kind === "http" || this.#custom !== undefined);
    if (keepalive) this.#keepaliveBytes += bytes.length;
    try {
      this.#sent[this.#custom ? "custom" : t.kind]++;
      if (keepalive) this.#sent.keepalive++;
      try {
        frame = await this.#bounded((signal) => t!.send(bytes, { keepalive, signal }));
      } catch (e) {
        if (this.#custom || t.kind !== "webtransport" || this.#transport !== "auto") throw e;
        // This merger's WebTransport does not work from here: HTTP for a while.
        this.#wtDownUntil[endpoint] = Date.now() + WEBTRANSPORT_RETRY_MS;
        const http = this.#http[endpoint];
        this.#sent.http++;
        frame = await this.#bounded((signal) => http.send(bytes, { signal }));
      }
    } catch {
      failed = true;
    } finally {
      if (keepalive) this.#keepaliveBytes -= bytes.length;
    }
    if (!this.#lanes.includes(lane)) return;
    const now = Date.now();
    if (!failed && frame === undefined) lane.core.retryAfter(now, seq, BEACON_RESEND_MS);
    else if (failed || !frame || !lane.core.handleReply(now, seq, frame)) lane.core.transportError(now, seq, endpoint);
    this.#settle(lane);
    this.#pump();
  }

  /**
   * `send(signal)`, or a rejection after the request timeout — one timer, which also aborts
   * the request through `signal` (a fetch stops; a WebTransport stream is left to its session).
   */
  #bounded<T>(send: (signal: AbortSignal) => Promise<T>): Promise<T> {
    const ctrl = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const t = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        ctrl.abort();
        reject(new Error("timeout"));
      }, this.#timeoutMs);
    });
    return Promise.race([send(ctrl.signal), t]).finally(() => clearTimeout(timer));
  }

  #settle(lane: Lane): void {
    if (!lane.own) {
      const s = lane.core.stats() as { outboxBytes: number };
      if (s.outboxBytes === 0) void this.#finishAdopted(lane);
      return;
    }
    if (this.#waiters.length === 0) return;
    const left: Waiter[] = [];
    for (const w of this.#waiters) {
      if (lane.core.flushed(w.token)) {
        clearTimeout(w.timer);
        w.resolve();
      } else left.push(w);
    }
    this.#waiters = left;
    this.#hold();
  }

  /** Queues what the lane's core asks to store and starts writing it. */
  #persist(lane: Lane): void {
    for (;;) {
      const op = lane.core.pollPersist();
      if (op === undefined) break;
      const o: StoredOp = { kind: op.tag, seq: op.seq, bytes: op.bytes };
      op.free();
      lane.ops.push(o);
      if (o.kind === 1 && o.bytes) lane.unstored.set(o.seq, o.bytes);
      else if (o.kind === 2) lane.unstored.delete(o.seq);
    }
    if (lane.ops.length > 0 && !lane.writing) lane.writing = this.#write(lane).finally(() => (lane.writing = undefined));
  }

  /**
   * Writes a lane's queued ops, one transaction at a time, in order. When the quota refuses,
   * the oldest waiting batch is dropped (counted in `dropped`, like an outbox overflow) and
   * the write tried again; a batch that still does not fit stays in memory only.
   */
  async #write(lane: Lane): Promise<void> {
    const store = this.#store;
    if (!store) return;
    while (lane.ops.length > 0) {
      const ops = coalesce(lane.ops.splice(0));
      try {
        await store.write(lane.epoch, ops);
        for (const o of ops) {
          if (o.kind === 1) {
            lane.stored.add(o.seq);
            lane.unstored.delete(o.seq);
          } else if (o.kind === 2) lane.stored.delete(o.seq);
        }
      } catch (e) {
        if (!isQuotaError(e)) {
          this.#storeErrors++;
          continue;
        }
        const puts = ops.filter((o) => o.kind === 1);
        const newest = puts.reduce((m, o) => Math.max(m, o.seq), -1);
        if (puts.length > 0 && this.#lanes.includes(lane) && lane.core.dropOldest(newest) >= 0) {
          // Its Remove follows from pollPersist; write everything again.
          lane.ops.unshift(...ops);
          this.#persist(lane);
        } else if (puts.length > 0) {
          // Nothing left to shed: keep the rest of the ops, the batches in memory only.
          lane.ops.unshift(...ops.filter((o) => o.kind !== 1));
        } else {
          this.#storeErrors++;
        }
      }
    }
  }

  /** Resolves once the lane's queued ops are written (or have failed). */
  async #settleStore(lane: Lane): Promise<void> {
    if (!this.#store) return;
    this.#persist(lane);
    // A write takes the ops queued while it runs, too; ops queued after it ends start another.
    for (let i = 0; i < 100 && lane.writing; i++) await lane.writing;
  }

  /** Looks for epochs whose page is gone and adopts their stored batches. */
  async #scan(): Promise<void> {
    const store = this.#store;
    if (!store || !this.#core || this.#offline) return;
    let epochs: string[];
    try {
      epochs = await store.epochs();
    } catch {
      this.#storeErrors++;
      return;
    }
    for (const epoch of epochs) {
      if (!this.#core) return;
      if (this.#lanes.some((l) => l.epoch === epoch) || this.#adopting.has(epoch)) continue;
      this.#adopting.add(epoch);
      // Holding the closed page's lock while its batches drain: one adopter at a time, and
      // if this page dies too, the next one takes over.
      void store
        .ifOrphaned(epoch, () => this.#adopt(store, epoch))
        .catch(() => this.#storeErrors++)
        .finally(() => this.#adopting.delete(epoch));
    }
  }

  async #adopt(store: Store, epoch: string): Promise<void> {
    const stored = await store.load(epoch);
    if (!this.#core) return;
    if (stored.batches.length === 0) {
      await store.forget(epoch);
      return;
    }
    const core = makeCore(this.#signer.publicKey, epochBytes(epoch), this.#config, stored.nextSeq, true);
    for (const [seq, bytes] of stored.batches) core.restore(seq, bytes);
    const lane: Lane = {
      core, epoch, own: false, ops: [], writing: undefined, stored: new Set(stored.batches.map(([s]) => s)), unstored: new Map(),
    };
    this.#adopted.epochs++;
    this.#adopted.batches += stored.batches.length;
    await new Promise<void>((resolve) => {
      lane.finish = resolve;
      this.#lanes.push(lane);
      this.#pump();
    });
  }

  /** An adopted lane is drained: forget its epoch, release its lock. */
  async #finishAdopted(lane: Lane): Promise<void> {
    const i = this.#lanes.indexOf(lane);
    if (i < 0) return;
    this.#lanes.splice(i, 1);
    addAdopted(this.#adopted, lane.core);
    await this.#settleStore(lane);
    await this.#store?.forget(lane.epoch).catch(() => this.#storeErrors++);
    lane.core.free();
    lane.finish?.();
  }
}

function addAdopted(into: Stats["adopted"], core: Core): void {
  const s = core.stats() as { acked: number; ackedRecords: number; rejected: number; dropped: number };
  into.acked += s.acked;
  into.ackedRecords += s.ackedRecords;
  into.rejected += s.rejected;
  into.dropped += s.dropped;
}

/** A merger base URL, checked, ending in `/`. */
function urlOf(e: string): string {
  let u: URL;
  try {
    u = new URL(e);
  } catch {
    throw new EdgetallyError("invalid_config", `edgetally: endpoint is not a URL: ${e}`);
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") {
    throw new EdgetallyError("invalid_config", `edgetally: endpoint must be http(s):// (got ${u.protocol})`);
  }
  return u.href.endsWith("/") ? u.href : u.href + "/";
}

const EMPTY = new Float64Array(0);

/** The timestamp to hand to wasm: now when absent; a non-finite one stays invalid (wasm reads NaN as "now"). */
function wasmTs(ts: number | undefined, now: number): number {
  if (ts === undefined) return now;
  return Number.isFinite(ts) ? ts : Infinity;
}
