// Browser persistence (the `persist` option): IndexedDB keeps this origin's producer key and,
// per page (each its own epoch), the epoch's next seq and its outbox of sealed, unacknowledged
// batches; Web Locks tell which epochs still have a live page. A page holds the lock of its
// epoch for its whole life, so a lock that can be taken belongs to a page that is gone — its
// stored batches are then adopted (resent) by a live page of the same origin.
//
// IndexedDB writes are asynchronous, and Chromium does not commit one started while the page
// unloads. So when a page is left, the batches whose IndexedDB write has not completed are
// also written synchronously to localStorage (a "spill", one key per epoch); the next page
// adopts them with the epoch's IndexedDB state. A batch in both is one batch (same seq, same
// bytes); resending it is idempotent.

const VERSION = 1;

/** @internal What the wasm producer asks to store: 0 next seq, 1 put batch, 2 remove batch. */
export interface StoredOp {
  kind: number;
  seq: number;
  bytes?: Uint8Array;
}

/** @internal An epoch's stored state. */
export interface StoredEpoch {
  nextSeq: number;
  batches: [number, Uint8Array][];
}

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

function done(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
    tx.onerror = (e) => e.preventDefault();
  });
}

/** Whether `e` is the storage quota refusing a write. */
export function isQuotaError(e: unknown): boolean {
  return (e as { name?: unknown } | null)?.name === "QuotaExceededError";
}

/** @internal Drops a Put followed by a Remove of the same batch, and all but the last next-seq. */
export function coalesce(ops: StoredOp[]): StoredOp[] {
  const removed = new Set<number>();
  const put = new Set<number>();
  for (const o of ops) if (o.kind === 1) put.add(o.seq);
  for (const o of ops) if (o.kind === 2 && put.has(o.seq)) removed.add(o.seq);
  let last = -1;
  ops.forEach((o, i) => {
    if (o.kind === 0) last = i;
  });
  return ops.filter((o, i) => (o.kind === 0 ? i === last : !removed.has(o.seq)));
}

function toBase64(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** The page's localStorage, if it has one that works. */
function local(): Storage | undefined {
  try {
    const l = (globalThis as { localStorage?: Storage }).localStorage;
    return l ?? undefined;
  } catch {
    return undefined;
  }
}

/** @internal One origin's edgetally database. */
export class Store {
  readonly name: string;
  readonly #db: IDBDatabase;

  private constructor(name: string, db: IDBDatabase) {
    this.name = name;
    this.#db = db;
  }

  /** Whether this runtime can persist (IndexedDB and Web Locks). */
  static available(): boolean {
    const g = globalThis as { indexedDB?: unknown; navigator?: { locks?: unknown } };
    return typeof g.indexedDB === "object" && g.indexedDB !== null && typeof g.navigator?.locks === "object";
  }

  static async open(name: string): Promise<Store> {
    const r = indexedDB.open(name, VERSION);
    r.onupgradeneeded = () => {
      const db = r.result;
      for (const s of ["meta", "epochs", "batches"]) if (!db.objectStoreNames.contains(s)) db.createObjectStore(s);
    };
    return new Store(name, await request(r));
  }

  /** The origin's producer key: the stored one, or `fresh`, stored now (first page wins a race). */
  async key(fresh: Uint8Array): Promise<Uint8Array> {
    const tx = this.#db.transaction("meta", "readwrite");
    const meta = tx.objectStore("meta");
    const got: unknown = await request(meta.get("key"));
    if (got instanceof Uint8Array && got.length === 32) {
      await done(tx);
      return got;
    }
    meta.put(fresh, "key");
    await done(tx);
    return fresh;
  }

  /** Applies `ops` of `epoch` in one transaction (all or nothing). */
  write(epoch: string, ops: StoredOp[]): Promise<void> {
    const tx = this.#db.transaction(["epochs", "batches"], "readwrite");
    const epochs = tx.objectStore("epochs");
    const batches = tx.objectStore("batches");
    for (const o of ops) {
      if (o.kind === 0) epochs.put({ nextSeq: o.seq, at: Date.now() }, epoch);
      else if (o.kind === 1 && o.bytes) batches.put(o.bytes, [epoch, o.seq]);
      else if (o.kind === 2) batches.delete([epoch, o.seq]);
    }
    return done(tx);
  }

  /** The epochs with stored state (their pages may be live or gone). */
  async epochs(): Promise<string[]> {
    const tx = this.#db.transaction(["epochs", "batches"], "readonly");
    const keys = new Set<string>();
    for (const k of await request(tx.objectStore("epochs").getAllKeys())) keys.add(String(k));
    // Batches whose epoch record a crash kept from being written still belong to someone.
    for (const k of await request(tx.objectStore("batches").getAllKeys())) if (Array.isArray(k)) keys.add(String(k[0]));
    for (const e of this.spilled()) keys.add(e);
    return [...keys];
  }

  /** An epoch's next seq and stored batches. */
  async load(epoch: string): Promise<StoredEpoch> {
    const tx = this.#db.transaction(["epochs", "batches"], "readonly");
    const e = (await request(tx.objectStore("epochs").get(epoch))) as { nextSeq?: number } | undefined;
    const range = IDBKeyRange.bound([epoch, -Infinity], [epoch, Infinity]);
    const store = tx.objectStore("batches");
    const [keys, values] = await Promise.all([request(store.getAllKeys(range)), request(store.getAll(range))]);
    const batches: [number, Uint8Array][] = [];
    keys.forEach((k, i) => {
      const v: unknown = values[i];
      if (Array.isArray(k) && typeof k[1] === "number" && v instanceof Uint8Array) batches.push([k[1], v]);
    });
    const seqs = new Set(batches.map(([s]) => s));
    for (const [seq, bytes] of this.unspill(epoch, false)) if (!seqs.has(seq)) batches.push([seq, bytes]);
    const top = batches.reduce((m, [s]) => Math.max(m, s + 1), 0);
    return { nextSeq: Math.max(e?.nextSeq ?? 0, top), batches };
  }

  /** Forgets an epoch whose outbox is empty. */
  forget(epoch: string): Promise<void> {
    this.unspill(epoch, true);
    const tx = this.#db.transaction(["epochs", "batches"], "readwrite");
    tx.objectStore("epochs").delete(epoch);
    tx.objectStore("batches").delete(IDBKeyRange.bound([epoch, -Infinity], [epoch, Infinity]));
    return done(tx);
  }

  close(): void {
    this.#db.close();
  }

  #spillKey(epoch: string): string {
    return `edgetally:${this.name}:spill:${epoch}`;
  }

  /**
   * Synchronously stores `batches` of `epoch` (those whose IndexedDB write may not have
   * completed) in localStorage, replacing the epoch's previous spill; with none, removes it.
   * False when localStorage is missing or full.
   */
  spill(epoch: string, batches: [number, Uint8Array][]): boolean {
    const l = local();
    if (!l) return false;
    try {
      if (batches.length === 0) l.removeItem(this.#spillKey(epoch));
      else l.setItem(this.#spillKey(epoch), JSON.stringify(batches.map(([seq, b]) => [seq, toBase64(b)])));
      return true;
    } catch {
      return false;
    }
  }

  /** The epochs with a spill. */
  spilled(): string[] {
    const l = local();
    const prefix = this.#spillKey("");
    const out: string[] = [];
    try {
      for (let i = 0; l && i < l.length; i++) {
        const k = l.key(i);
        const epoch = k?.startsWith(prefix) ? k.slice(prefix.length) : "";
        // An epoch is a u64 in decimal; anything else under the prefix is not ours.
        if (/^\d{1,20}$/.test(epoch)) out.push(epoch);
      }
    } catch {
      // No localStorage here: nothing spilled.
    }
    return out;
  }

  /** An epoch's spilled batches (malformed entries skipped), removing the spill when `remove`. */
  unspill(epoch: string, remove: boolean): [number, Uint8Array][] {
    const l = local();
    const out: [number, Uint8Array][] = [];
    try {
      const text = l?.getItem(this.#spillKey(epoch));
      if (remove) l?.removeItem(this.#spillKey(epoch));
      const v: unknown = text ? JSON.parse(text) : [];
      for (const e of Array.isArray(v) ? v : []) {
        if (!Array.isArray(e) || !Number.isInteger(e[0]) || e[0] < 0 || typeof e[1] !== "string") continue;
        try {
          out.push([e[0], fromBase64(e[1])]);
        } catch {
          // Not base64: skipped; the batch is in IndexedDB or lost with its page.
        }
      }
    } catch {
      // A spill that does not parse holds nothing usable.
    }
    return out;
  }

  /** The lock a page holds on its epoch while it lives. */
  lockName(epoch: string): string {
    return `edgetally:${this.name}:${epoch}`;
  }

  /** Takes the lock of `epoch` and holds it until the returned function is called (or the page is gone). */
  async hold(epoch: string): Promise<() => void> {
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    await new Promise<void>((granted, fail) => {
      navigator.locks
        .request(this.lockName(epoch), () => {
          granted();
          return held;
        })
        .catch(fail);
    });
    return release;
  }

  /** Runs `f` holding the lock of `epoch` if no live page holds it; false (without running `f`) otherwise. */
  async ifOrphaned(epoch: string, f: () => Promise<void>): Promise<boolean> {
    return navigator.locks.request(this.lockName(epoch), { ifAvailable: true }, async (lock) => {
      if (!lock) return false;
      await f();
      return true;
    });
  }
}
