// The WebTransport transport: one session per merger, one batch per bidirectional stream (the
// signed envelope, then FIN; the merger answers with the bare reply, then FIN) — the same
// bytes as native QUIC. The merger publishes where to connect and which certificates to pin
// at GET /v1/webtransport (the current and the next certificate's SHA-256, so a session made
// before a rotation and one made after it both verify).

import type { BatchTransport } from "./transport.js";

/** What a merger publishes at `GET /v1/webtransport`. */
interface Discovery {
  url: string | null;
  cert_sha256: string[];
}

interface WtStream {
  readable: ReadableStream<Uint8Array>;
  writable: WritableStream<Uint8Array>;
}

interface WtSession {
  ready: Promise<unknown>;
  closed: Promise<unknown>;
  createBidirectionalStream(): Promise<WtStream>;
  close(info?: { closeCode?: number; reason?: string }): void;
}

type WtConstructor = new (
  url: string,
  options?: { serverCertificateHashes?: { algorithm: string; value: Uint8Array }[] },
) => WtSession;

/** The runtime's WebTransport, if it has one (browsers; not Node or workerd). */
export function webTransportCtor(): WtConstructor | undefined {
  const c = (globalThis as { WebTransport?: unknown }).WebTransport;
  return typeof c === "function" ? (c as WtConstructor) : undefined;
}

function unhex(s: string): Uint8Array {
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** One merger's WebTransport session, opened on first use and again after it closes. */
export class WebTransportLink implements BatchTransport {
  readonly kind = "webtransport";
  readonly #base: string;
  readonly #fetch: typeof fetch;
  readonly #pins: string[] | undefined;
  #session: Promise<WtSession> | undefined;

  constructor(base: string, f: typeof fetch, pins: string[] | undefined) {
    this.#base = base.endsWith("/") ? base : base + "/";
    this.#fetch = f;
    this.#pins = pins;
  }

  async #open(): Promise<WtSession> {
    const Ctor = webTransportCtor();
    if (!Ctor) throw new Error("no WebTransport in this runtime");
    const res = await this.#fetch(new URL("v1/webtransport", this.#base).href);
    if (res.status !== 200) throw new Error(`GET /v1/webtransport: ${res.status}`);
    const d = (await res.json()) as Discovery;
    if (typeof d.url !== "string") throw new Error("the merger published no WebTransport URL");
    const hashes = this.#pins ?? d.cert_sha256;
    const session = new Ctor(
      d.url,
      hashes.length > 0
        ? { serverCertificateHashes: hashes.map((h) => ({ algorithm: "sha-256", value: unhex(h) })) }
        : {},
    );
    await session.ready;
    return session;
  }

  #get(): Promise<WtSession> {
    if (!this.#session) {
      const p = this.#open();
      this.#session = p;
      p.then(
        (s) => s.closed.then(drop, drop),
        drop,
      );
      const self = this;
      function drop(): void {
        if (self.#session === p) self.#session = undefined;
      }
    }
    return this.#session;
  }

  /** Sends one sealed batch; resolves to the merger's bare reply. Rejects on any failure. */
  async send(bytes: Uint8Array): Promise<Uint8Array> {
    const session = await this.#get();
    const stream = await session.createBidirectionalStream();
    const w = stream.writable.getWriter();
    await w.write(bytes);
    await w.close();
    const r = stream.readable.getReader();
    const parts: Uint8Array[] = [];
    let n = 0;
    for (;;) {
      const { done, value } = await r.read();
      if (done) break;
      parts.push(value);
      n += value.length;
      if (n > 64) throw new Error("reply too long");
    }
    const out = new Uint8Array(n);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  /** Closes the session, if one is open. */
  close(): void {
    const s = this.#session;
    this.#session = undefined;
    s?.then((x) => x.close(), () => {});
  }
}
