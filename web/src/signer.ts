// The producer's ed25519 key, in WebCrypto: the wasm module seals batches unsigned and this
// signs them (Ed25519 is deterministic, so the bytes are those any ed25519 library makes).
// Signing here rather than in wasm keeps ~10 KB of curve arithmetic and SHA-512 out of the
// gzipped module every page downloads.

import { EdgetallyError } from "./errors.js";

/** PKCS #8 wrapping of a raw 32-byte Ed25519 seed (RFC 8410): this prefix, then the seed. */
const PKCS8_PREFIX = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
const ED25519 = { name: "Ed25519" };

export class Signer {
  /** The public key (32 bytes): the producer key batches carry. */
  readonly publicKey: Uint8Array;
  readonly #key: CryptoKey;

  private constructor(publicKey: Uint8Array, key: CryptoKey) {
    this.publicKey = publicKey;
    this.#key = key;
  }

  /** The key of a 32-byte secret seed (fresh random, or the origin's stored one). */
  static async fromSeed(seed: Uint8Array): Promise<Signer> {
    const subtle = globalThis.crypto?.subtle;
    const der = new Uint8Array(48);
    der.set(PKCS8_PREFIX);
    der.set(seed, 16);
    try {
      // Extractable once, for its public half (JWK `x`); the signing key is not.
      const jwk = await subtle.exportKey("jwk", await subtle.importKey("pkcs8", der, ED25519, true, ["sign"]));
      const key = await subtle.importKey("pkcs8", der, ED25519, false, ["sign"]);
      const x = atob((jwk.x ?? "").replace(/-/g, "+").replace(/_/g, "/"));
      const pk = Uint8Array.from(x, (c) => c.charCodeAt(0));
      if (pk.length !== 32) throw new Error("bad public key");
      return new Signer(pk, key);
    } catch {
      throw new EdgetallyError(
        "unsupported_runtime",
        "edgetally: this runtime's WebCrypto cannot sign with Ed25519 (Chrome 137+, Firefox 129+, Safari 17+, Node 18.4+, Deno and workerd can)",
      );
    } finally {
      der.fill(0);
    }
  }

  /** The 64-byte signature of `message`. */
  async sign(message: Uint8Array<ArrayBuffer>): Promise<Uint8Array> {
    return new Uint8Array(await globalThis.crypto.subtle.sign(ED25519, this.#key, message));
  }
}
