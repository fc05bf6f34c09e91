// The one error type the SDK throws.

import { reasonName } from "../pkg/edgetally_wasm.js";

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
