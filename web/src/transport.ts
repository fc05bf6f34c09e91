// The transports: one interface, three ways a batch leaves — WebTransport (webtransport.ts),
// fetch POST /v1/batches, and navigator.sendBeacon for a page being left. Each carries the
// signed envelope as it is; only the reply's form differs.

/** How a batch went out: the built-in transports, or one the application gave (`"custom"`). */
export type TransportKind = "webtransport" | "http" | "beacon" | "custom";

/** How one send goes: `keepalive` (a page being left), `signal` aborts it (the producer's request timeout). */
export interface SendOptions {
  keepalive?: boolean;
  signal?: AbortSignal;
}

/**
 * One merger, one way of reaching it. The built-in ones are WebTransport, `fetch` and beacons;
 * an application may give its own (`ProducerOptions.transports`: a message queue, a proxy, a
 * test double). The producer keeps every guarantee whatever the transport: a batch leaves the
 * outbox only on an Ack, and is resent (to this merger or the next) on a rejection or a Retry.
 */
export interface BatchTransport {
  /** How batches through it are counted in `stats().sentByTransport` (`"custom"` for yours). */
  readonly kind: TransportKind;
  /**
   * Sends one sealed batch. Resolves to the merger's bare reply (docs/PROTOCOL.md §5), or to
   * `undefined` when the transport has none to give (a beacon: the browser took the batch
   * and will deliver it after the page is gone). Rejects on any transport failure.
   */
  send(bytes: Uint8Array<ArrayBuffer>, options?: SendOptions): Promise<Uint8Array | undefined>;
  close(): void;
}

function hexBytes(s: string): Uint8Array | undefined {
  if (s.length % 2 !== 0 || !/^[0-9a-f]*$/i.test(s)) return undefined;
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** The largest body a keepalive request or a beacon may carry (the browsers' shared budget). */
export const KEEPALIVE_BUDGET = 64 << 10;

/** @internal `POST /v1/batches`: the bare envelope as the body, a JSON reply holding the bare reply in hex. */
export class HttpTransport implements BatchTransport {
  readonly kind = "http";
  /** `<endpoint>/v1/batches`. */
  readonly url: string;
  readonly #fetch: typeof fetch;
  /** The enrolment credential, sent as a header when set. */
  credential: string | undefined;

  constructor(url: string, f: typeof fetch) {
    this.url = url;
    this.#fetch = f;
  }

  async send(bytes: Uint8Array<ArrayBuffer>, options?: SendOptions): Promise<Uint8Array | undefined> {
    const res = await this.#fetch(this.url, {
      method: "POST",
      body: bytes,
      headers: this.credential === undefined
        ? { "content-type": "application/octet-stream" }
        : { "content-type": "application/octet-stream", "edgetally-credential": this.credential },
      signal: options?.signal,
      keepalive: options?.keepalive === true && bytes.length <= KEEPALIVE_BUDGET,
    });
    const text = await res.text();
    if (res.status === 200 || res.status === 422 || res.status === 503) {
      const reply = JSON.parse(text) as { frame?: unknown };
      const frame = typeof reply.frame === "string" ? hexBytes(reply.frame) : undefined;
      if (frame) return frame;
    }
    throw new Error(`POST /v1/batches: HTTP ${res.status}`);
  }

  close(): void {}

  /** Whether this runtime's fetch honours `keepalive` (else a page being left uses beacons). */
  static keepalive(): boolean {
    const R = (globalThis as { Request?: { prototype: object } }).Request;
    return R !== undefined && "keepalive" in R.prototype;
  }
}

/** @internal `navigator.sendBeacon` to `/v1/batches`: no reply, so the batch stays stored until a later send is acked. */
export class BeaconTransport implements BatchTransport {
  readonly kind = "beacon";
  readonly #url: string;

  constructor(url: string) {
    this.#url = url;
  }

  /** Whether this runtime has `sendBeacon`. */
  static available(): boolean {
    const n = (globalThis as { navigator?: { sendBeacon?: unknown } }).navigator;
    return typeof n?.sendBeacon === "function";
  }

  send(bytes: Uint8Array<ArrayBuffer>): Promise<undefined> {
    const n = (globalThis as { navigator?: { sendBeacon?: (u: string, d: Blob) => boolean } }).navigator;
    // An untyped body keeps the beacon a CORS-simple request (the merger reads any body).
    if (bytes.length > KEEPALIVE_BUDGET || !n?.sendBeacon?.(this.#url, new Blob([bytes]))) {
      return Promise.reject(new Error("the browser refused the beacon"));
    }
    return Promise.resolve(undefined);
  }

  close(): void {}
}
