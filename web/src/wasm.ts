// How the wasm module gets loaded: each entry point (index.ts, workerd.ts) sets a loader for
// its runtime; the first `Producer.create` runs it.

import { EdgetallyError } from "./errors.js";

let loader: (() => Promise<void> | void) | undefined;
let loaded: Promise<void> | undefined;

/** @internal Set by each entry point: how this runtime gets the wasm module. */
export function setWasmLoader(load: () => Promise<void> | void): void {
  loader = load;
}

/** @internal Resolves once the wasm module is instantiated. */
export function ready(): Promise<void> {
  if (!loaded) {
    if (!loader) throw new EdgetallyError("not_initialized", "edgetally: no wasm loader (import the package entry point)");
    const l = loader;
    loaded = Promise.resolve().then(() => l());
    loaded.catch(() => (loaded = undefined));
  }
  return loaded;
}
