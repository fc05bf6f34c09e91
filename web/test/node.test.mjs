// The SDK in Node against a real merger: a known workload through all three record paths,
// then the failure cases (merger down at first, restarted mid-stream, a Nack, outbox overflow).

import { test } from "node:test";
import assert from "node:assert/strict";
import { EdgetallyError, Producer } from "edgetally";
import { execFileSync, spawn } from "node:child_process";
import { join } from "node:path";
import { rmSync } from "node:fs";
import { BIN, compare, freePort, Model, startMerger, tempDir, workload } from "./helpers.mjs";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test("a known workload through record, handles and recordMany arrives exactly", async () => {
  const m = await startMerger();
  try {
    const p = await Producer.create({ endpoints: [m.http], flushIntervalMs: 50, maxBatchSummaries: 100 });
    const now = Date.now();
    const model = new Model();
    const events = workload(1, 3000, now);
    // A third by name, a third by handle, a third in bulk.
    const third = events.length / 3;
    for (const e of events.slice(0, third)) {
      p.record(e.category, e.value, { entity: e.entity, ts_ms: e.ts_ms });
      model.add(e.category, e.entity, e.value);
    }
    for (const e of events.slice(third, 2 * third)) {
      p.handle(e.category, e.entity).record(e.value, e.ts_ms);
      model.add(e.category, e.entity, e.value);
    }
    const bulk = events.slice(2 * third);
    const ids = new Uint32Array(bulk.map((e) => p.handle(e.category, e.entity).id));
    const n = p.recordMany(ids, new Float64Array(bulk.map((e) => e.value)), new Float64Array(bulk.map((e) => e.ts_ms)));
    assert.equal(n, bulk.length);
    for (const e of bulk) model.add(e.category, e.entity, e.value);
    // One handle in bulk, timestamped now.
    const h = p.handle("requests", "edge-a");
    assert.equal(p.recordMany(h, [1, 2.5, 3.25]), 3);
    for (const v of [1, 2.5, 3.25]) model.add("requests", "edge-a", v);

    await p.flush({ timeoutMs: 20_000 });
    const s = p.stats();
    assert.equal(s.recorded, events.length + 3);
    assert.equal(s.ackedRecords, events.length + 3);
    assert.equal(s.invalid + s.rejected + s.dropped, 0);
    assert.ok(s.acked >= 2, `several batches (${s.acked})`);
    assert.match(p.producerKey, /^[0-9a-f]{64}$/);
    assert.deepEqual(await compare(m.http, model, now - 120_000, now + 60_000), []);
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("producerKey and epoch name what the signed envelopes carry", async () => {
  const m = await startMerger();
  try {
    const bodies = [];
    const f = (url, init) => {
      if (init?.body instanceof Uint8Array) bodies.push(new Uint8Array(init.body));
      return fetch(url, init);
    };
    const p = await Producer.create({ endpoints: [m.http], transport: "http", fetch: f, flushIntervalMs: 50 });
    p.record("k", 1);
    await p.flush({ timeoutMs: 20_000 });
    assert.ok(bodies.length >= 1);
    // docs/PROTOCOL.md: version u8, payload length varint, then the payload: producer [32],
    // epoch varint, … (postcard varints: 7 bits per byte, low first).
    const b = bodies[0];
    let at = 1;
    const varint = () => {
      let v = 0n;
      for (let shift = 0n; ; shift += 7n) {
        const x = b[at++];
        v |= BigInt(x & 0x7f) << shift;
        if (x < 0x80) return v;
      }
    };
    assert.equal(b[0], 1);
    varint();
    const key = Array.from(b.subarray(at, at + 32), (x) => x.toString(16).padStart(2, "0")).join("");
    at += 32;
    assert.equal(p.producerKey, key);
    assert.equal(p.epoch, varint().toString());
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("an application's own BatchTransport carries every batch, and a failing one is retried", async () => {
  const m = await startMerger();
  try {
    // A transport of the application's own: POST /v1/batches by hand, failing its first two sends.
    let calls = 0;
    const seen = [];
    const transports = (endpoint) => ({
      kind: "custom",
      async send(bytes, options) {
        calls++;
        if (calls <= 2) throw new Error("the application's network is down");
        const res = await fetch(new URL("v1/batches", endpoint.endsWith("/") ? endpoint : endpoint + "/"), {
          method: "POST",
          body: bytes,
          headers: { "content-type": "application/octet-stream" },
          signal: options?.signal,
        });
        const reply = await res.json();
        seen.push(res.status);
        return Uint8Array.from(reply.frame.match(/../g).map((h) => parseInt(h, 16)));
      },
      close() {},
    });
    const p = await Producer.create({ endpoints: [m.http], transports, flushIntervalMs: 50 });
    const now = Date.now();
    const model = new Model();
    for (const e of workload(7, 300, now)) {
      p.record(e.category, e.value, { entity: e.entity, ts_ms: e.ts_ms });
      model.add(e.category, e.entity, e.value);
    }
    await p.flush({ timeoutMs: 20_000 });
    const s = p.stats();
    assert.equal(s.ackedRecords, 300);
    assert.ok(calls > 2 && seen.length >= 1, `${calls} calls`);
    assert.equal(s.sentByTransport.custom, calls);
    assert.equal(s.sentByTransport.http + s.sentByTransport.webtransport, 0);
    assert.deepEqual(await compare(m.http, model, now - 120_000, now + 60_000), []);
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("invalid events throw typed errors, are counted, and spoil nothing else", async () => {
  const m = await startMerger();
  try {
    const p = await Producer.create({ endpoints: [m.http] });
    const now = Date.now();
    const bad = [
      () => p.record("t", NaN),
      () => p.record("t", 1e16),
      () => p.record("", 1),
      () => p.record("t", 1, { ts_ms: now - 30 * 86_400_000 }),
      () => p.record("t", 1, { ts_ms: now + 3_600_000 }),
      () => p.handle("t").record(Infinity),
    ];
    const codes = bad.map((f) => {
      try {
        f();
        return "no error";
      } catch (e) {
        assert.ok(e instanceof EdgetallyError && e instanceof Error);
        return e.code;
      }
    });
    assert.deepEqual(codes, [
      "invalid_value",
      "invalid_value",
      "invalid_category",
      "bucket_too_old",
      "future_timestamp",
      "invalid_value",
    ]);
    p.record("t", 2, { ts_ms: now });
    await p.flush({ timeoutMs: 20_000 });
    const s = p.stats();
    assert.equal(s.invalid, 6);
    assert.equal(s.invalidByReason.invalid_value, 3);
    assert.equal(s.ackedRecords, 1);
    const model = new Model();
    model.add("t", undefined, 2);
    assert.deepEqual(await compare(m.http, model, now - 60_000, now + 60_000), []);
    await assert.rejects(Producer.create({ endpoints: [] }), (e) => e.code === "invalid_config");
    await assert.rejects(Producer.create({ endpoints: ["ftp://x"] }), (e) => e.code === "invalid_config");
    await assert.rejects(Producer.create({ endpoints: [m.http], bucketMs: 7 }), (e) => e.code === "invalid_bucket_width");
    await assert.rejects(Producer.create({ endpoints: [m.http], transport: "carrier-pigeon" }), (e) => e.code === "unsupported_transport");
    await p.close();
    assert.throws(() => p.record("t", 1), (e) => e.code === "closed");
  } finally {
    await m.cleanup();
  }
});

test("merger down at first: retries deliver once it starts, nothing doubles", async () => {
  const port = await freePort();
  const dir = tempDir();
  const p = await Producer.create({ endpoints: [`http://127.0.0.1:${port}`], flushIntervalMs: 20 });
  const now = Date.now();
  const model = new Model();
  for (const e of workload(2, 500, now)) {
    p.record(e.category, e.value, { entity: e.entity, ts_ms: e.ts_ms });
    model.add(e.category, e.entity, e.value);
  }
  const flushed = p.flush({ timeoutMs: 60_000 });
  await sleep(1500);
  assert.equal(p.stats().acked, 0);
  assert.ok(p.stats().retried >= 1, "retried while the merger was down");
  const m = await startMerger({ dir, httpPort: port });
  try {
    await flushed;
    const s = p.stats();
    assert.equal(s.ackedRecords, 500);
    assert.deepEqual(await compare(m.http, model, now - 120_000, now + 60_000), []);
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("a merger killed and restarted mid-stream: everything arrives exactly once", async () => {
  const port = await freePort();
  const dir = tempDir();
  let m = await startMerger({ dir, httpPort: port });
  try {
    const p = await Producer.create({ endpoints: [m.http], flushIntervalMs: 10, maxBatchSummaries: 20 });
    const now = Date.now();
    const model = new Model();
    const events = workload(3, 2000, now);
    for (const [i, e] of events.entries()) {
      p.record(e.category, e.value, { entity: e.entity, ts_ms: e.ts_ms });
      model.add(e.category, e.entity, e.value);
      if (i === 700) {
        await sleep(30);
        await m.kill9();
      }
      if (i === 1400) {
        await sleep(200);
        m = await startMerger({ dir, httpPort: port });
      }
      if (i % 100 === 0) await sleep(1);
    }
    await p.flush({ timeoutMs: 60_000 });
    assert.equal(p.stats().ackedRecords, events.length);
    assert.deepEqual(await compare(m.http, model, now - 120_000, now + 60_000), []);
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("a Nack drops the batch and counts it by reason", async () => {
  // The merger keeps only the last hour; the producer (7 days) accepts an older event.
  const m = await startMerger({ env: { EDGETALLY_MAX_LATENESS_MS: "3600000" } });
  try {
    const p = await Producer.create({ endpoints: [m.http] });
    const now = Date.now();
    p.record("old", 1, { ts_ms: now - 2 * 3_600_000 });
    await p.flush({ timeoutMs: 20_000 });
    p.record("new", 5, { ts_ms: now });
    await p.flush({ timeoutMs: 20_000 });
    const s = p.stats();
    assert.equal(s.rejected, 1);
    assert.equal(s.rejectedByReason.bucket_too_old, 1);
    assert.equal(s.rejectedRecords, 1);
    assert.equal(s.ackedRecords, 1);
    const model = new Model();
    model.add("new", undefined, 5);
    assert.deepEqual(await compare(m.http, model, now - 60_000, now + 60_000), []);
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("a script that awaits flush() without a timeout stays alive until its events are delivered", async () => {
  // The merger is down when the script starts and comes up 2 s later: nothing but flush()
  // keeps the script's process alive meanwhile.
  const port = await freePort();
  const script = `
    import { Producer } from "edgetally";
    const p = await Producer.create({ endpoints: ["http://127.0.0.1:${port}"] });
    p.record("late_merger", 3, { ts_ms: Date.now() });
    await p.flush();
    const s = p.stats();
    console.log(JSON.stringify({ acked: s.ackedRecords, retried: s.retried }));
    await p.close();
  `;
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], {
    cwd: new URL("..", import.meta.url),
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (err += d));
  const exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)));
  await sleep(2000);
  const m = await startMerger({ httpPort: port });
  try {
    const code = await Promise.race([exited, sleep(30_000).then(() => "timeout")]);
    assert.equal(code, 0, `the script exited with ${code} before delivering: ${out} ${err}`);
    const got = JSON.parse(out.trim());
    assert.equal(got.acked, 1);
    assert.ok(got.retried >= 1, out);
    const now = Date.now();
    const model = new Model();
    model.add("late_merger", undefined, 3);
    assert.deepEqual(await compare(m.http, model, now - 120_000, now + 60_000), []);
  } finally {
    child.kill();
    await m.cleanup();
  }
});

test("an enrolled merger admits the producer once its credential is set", async () => {
  const dir = tempDir();
  const issuerKey = join(dir, "issuer.key");
  const keygen = execFileSync(BIN, ["keygen", "--out", issuerKey], { encoding: "utf8" });
  const issuer = /public key: ([0-9a-f]{64})/.exec(keygen)[1];
  const m = await startMerger({ env: { EDGETALLY_PRODUCER_POLICY: "enrolled", EDGETALLY_ISSUER_KEYS: issuer } });
  try {
    const now = Date.now();
    // Without a credential: refused, counted by reason.
    const anon = await Producer.create({ endpoints: [m.http] });
    anon.record("enrolled", 1, { ts_ms: now });
    await anon.flush({ timeoutMs: 20_000 });
    assert.equal(anon.stats().rejectedByReason.not_admitted, 1);
    await anon.close();
    // With one issued for its key: delivered.
    const p = await Producer.create({ endpoints: [m.http] });
    assert.throws(() => p.setCredential("ec01zz"), (e) => e instanceof EdgetallyError && e.code === "invalid_config");
    const cred = execFileSync(BIN, ["enroll", "--issuer-key", issuerKey, "--producer", p.producerKey], { encoding: "utf8" }).trim();
    p.setCredential(cred);
    p.record("enrolled", 2, { ts_ms: now });
    p.record("enrolled", 3, { ts_ms: now });
    await p.flush({ timeoutMs: 20_000 });
    assert.equal(p.stats().rejected, 0);
    const model = new Model();
    model.add("enrolled", undefined, 2);
    model.add("enrolled", undefined, 3);
    assert.deepEqual(await compare(m.http, model, now - 60_000, now + 60_000), []);
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("outbox overflow drops the oldest batches and counts them", async () => {
  const port = await freePort();
  // Nothing listens: every batch stays in the outbox, which holds about two of them.
  const p = await Producer.create({ endpoints: [`http://127.0.0.1:${port}`], maxOutboxBytes: 400, maxInFlight: 1 });
  const now = Date.now();
  const batches = 6;
  const flushes = [];
  for (let b = 0; b < batches; b++) {
    for (let i = 0; i < 3; i++) p.record(`c${b}`, i, { entity: `e${i}`, ts_ms: now });
    // A flush whose batches (and all before them) were dropped is answered; one whose
    // batch is still waiting is never answered: close() rejects it.
    flushes.push(p.flush().then(() => "flushed", (e) => e.code));
  }
  const s = p.stats();
  assert.equal(s.recorded, 18);
  assert.ok(s.dropped >= 1, `dropped ${s.dropped}`);
  // Every record is in exactly one place: dropped, or still waiting in the outbox.
  assert.equal(s.droppedRecords % 3, 0);
  assert.equal(s.dropped * 3, s.droppedRecords);
  assert.ok(s.outboxBytes <= 400);
  assert.equal(s.queued + s.inFlight + s.dropped, batches);
  await assert.rejects(p.close({ timeoutMs: 50 }), (e) => e.code === "timeout");
  // Batches are dropped oldest first: the answered flushes are a prefix, at most one per
  // dropped batch, and the newest batch (never dropped: the outbox holds two) is waiting.
  const got = await Promise.all(flushes);
  const answered = got.filter((r) => r === "flushed").length;
  assert.deepEqual(got, [...Array(answered).fill("flushed"), ...Array(batches - answered).fill("closed")]);
  assert.ok(answered <= s.dropped && answered < batches, `${answered} answered, ${s.dropped} dropped`);
});

test("sums are exact on every path: fast JavaScript sums, wasm fallbacks, bucket changes", async () => {
  const m = await startMerger();
  try {
    const p = await Producer.create({ endpoints: [m.http], flushIntervalMs: 30 });
    const now = Date.now();
    const model = new Model();
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    // Decimals of every length, thirds, big values beyond the fast path, -0, values whose
    // sum crosses the fast path's bound (2e6 → 2e15 nano-units), tiny ones.
    const gen = () => {
      const r = rand();
      if (r < 0.3) return Math.round((rand() - 0.5) * 2e6 * 10 ** 3) / 10 ** 3;
      if (r < 0.45) return (rand() - 0.5) * 1e4; // full-precision floats
      if (r < 0.55) return Math.floor(rand() * 1000) / 3;
      if (r < 0.65) return (rand() - 0.5) * 1e15;
      if (r < 0.7) return -0;
      if (r < 0.8) return 2e6;
      if (r < 0.9) return 1e-9 * Math.floor(rand() * 100);
      return Math.round(rand() * 1e9) / 1e9;
    };
    const h = p.handle("mixed", "h");
    const vs = new Float64Array(5000);
    for (let round = 0; round < 4; round++) {
      for (let i = 0; i < 5000; i++) {
        const v = gen();
        const ts = now - 3000 + Math.floor(rand() * 3000); // three buckets, interleaved
        h.record(v, ts);
        model.add("mixed", "h", v);
        const w = gen();
        p.record("mixed", w, { entity: "named", ts_ms: now });
        model.add("mixed", "named", w);
      }
      for (let i = 0; i < vs.length; i++) vs[i] = gen();
      assert.equal(p.recordMany(p.handle("mixed", "bulk"), vs), vs.length);
      for (const v of vs) model.add("mixed", "bulk", v);
      await sleep(40); // a flush tick in between: handles drain and re-open
    }
    await p.flush({ timeoutMs: 20_000 });
    const s = p.stats();
    assert.equal(s.recorded, 4 * 15_000);
    assert.equal(s.ackedRecords, 4 * 15_000);
    assert.deepEqual(await compare(m.http, model, now - 60_000, now + 60_000), []);
    await p.close();
  } finally {
    await m.cleanup();
  }
});

test("the npm tarball installs into a fresh project and works from ESM and from CommonJS", async () => {
  // What a user without Rust does: `npm pack` here, `npm install ./edgetally-<version>.tgz` there.
  const dir = tempDir("edgetally-pack-");
  const web = new URL("..", import.meta.url).pathname;
  const npm = process.platform === "win32" ? "npm.cmd" : "npm";
  const tgz = execFileSync(npm, ["pack", "--silent", "--pack-destination", dir], { cwd: web, encoding: "utf8" }).trim().split("\n").pop();
  const app = join(dir, "app");
  execFileSync("mkdir", ["-p", app]);
  execFileSync(npm, ["init", "-y"], { cwd: app, stdio: "ignore" });
  execFileSync(npm, ["install", "--no-audit", "--no-fund", "--offline", join(dir, tgz)], { cwd: app, stdio: "ignore" });
  const m = await startMerger();
  try {
    const esm = `import { Producer } from "edgetally";
      const p = await Producer.create({ endpoints: [process.argv[1]] });
      for (let i = 0; i < 100; i++) p.record("from_esm", i);
      await p.flush();
      console.log(p.stats().ackedRecords);
      await p.close();`;
    const cjs = `const { Producer } = require("edgetally");
      (async () => {
        const p = await Producer.create({ endpoints: [process.argv[1]] });
        for (let i = 0; i < 100; i++) p.record("from_cjs", i);
        await p.flush();
        console.log(p.stats().ackedRecords);
        await p.close();
      })();`;
    const esmOut = execFileSync(process.execPath, ["--input-type=module", "-e", esm, m.http], { cwd: app, encoding: "utf8" });
    const cjsOut = execFileSync(process.execPath, ["-e", cjs, m.http], { cwd: app, encoding: "utf8" });
    assert.equal(esmOut.trim(), "100");
    assert.equal(cjsOut.trim(), "100");
    const want = new Model();
    for (let i = 0; i < 100; i++) {
      want.add("from_esm", undefined, i);
      want.add("from_cjs", undefined, i);
    }
    const now = Date.now();
    assert.deepEqual(await compare(m.http, want, now - 120_000, now + 60_000), []);
  } finally {
    await m.cleanup();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a burst recorded once, with no further call, is delivered within the flush interval", async () => {
  // Issue 28, finding 5: the sealed batch waited (queued: 1, inFlight: 0) for the next
  // record(), flush() or close(). Nothing here calls the producer after the burst.
  const m = await startMerger();
  try {
    const p = await Producer.create({ endpoints: [m.http], flushIntervalMs: 2000 });
    for (let i = 0; i < 200; i++) p.record("quiet_burst", i % 10);
    const start = Date.now();
    let got = {};
    while (Date.now() - start < 10_000) {
      got = await (await fetch(`${m.http}/v1/aggregate?category=quiet_burst&start=0&end=9999999999999`)).json();
      if (got.count >= 200) break;
      await sleep(100);
    }
    assert.equal(got.count, 200, `after ${Date.now() - start} ms: ${JSON.stringify(got)} ${JSON.stringify(p.stats())}`);
    assert.equal(got.sum_exact, "900");
    await p.close();
  } finally {
    await m.cleanup();
  }
});
