// The built-in dashboard at `/`, in headless Chromium against a real merger: it renders
// non-empty charts whose values are the API's own, tables equal to the API's answers, shows
// hostile category names as text (no markup runs), loads nothing from elsewhere, and breaks
// no Content-Security-Policy rule. A screenshot is kept in target/artifacts/dashboard.png.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS, ROOT, getJson, startMerger } from "./helpers.mjs";

test("the vendored uPlot is the npm package's, byte for byte", () => {
  for (const f of ["uPlot.iife.min.js", "uPlot.min.css"]) {
    const vendored = readFileSync(join(ROOT, "crates/edgetally-merger/assets/vendor", f));
    const npm = readFileSync(join(ROOT, "web/node_modules/uplot/dist", f));
    assert.ok(vendored.equals(npm), `${f} differs from uplot's (update assets/vendor)`);
  }
});

test("the dashboard charts and tabulates the API's numbers", { timeout: 120_000 }, async () => {
  const m = await startMerger({ env: { EDGETALLY_QUANTILE_CATEGORIES: "temperature" } });
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS });
  try {
    const now = Date.now();
    const hostile = `<img src=x onerror="window.__pwned=1">`;
    const events = [];
    for (let i = 0; i < 300; i++) {
      const ts = now - 5_000 - ((i * 7919) % 600_000);
      events.push({ ts_ms: ts, category: "temperature", entity: `dev-${i % 5}`, value: (i % 23) * 0.5 - 3 });
      if (i % 3 === 0) events.push({ ts_ms: ts, category: "page_view", entity: `user-${i % 7}`, subject: `visitor-${i % 41}` });
    }
    events.push({ ts_ms: now - 2_000, category: hostile, value: 1 });
    events.push({ ts_ms: now - 3_000, category: "__proto__", value: 2 });
    const res = await fetch(`${m.http}/v1/events`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(events),
    });
    assert.equal(res.status, 200, await res.text());

    const page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
    const problems = [];
    page.on("console", (msg) => msg.type() === "error" && problems.push(msg.text()));
    page.on("pageerror", (e) => problems.push(String(e)));
    page.on("response", (r) => r.status() >= 400 && problems.push(`${r.status()} ${r.url()}`));
    const foreign = [];
    page.on("request", (r) => !r.url().startsWith(m.http) && foreign.push(r.url()));
    page.on("dialog", (d) => {
      problems.push(`dialog: ${d.message()}`);
      d.dismiss();
    });
    const answer = await page.goto(`${m.http}/`);
    assert.equal(answer.status(), 200);
    assert.match(answer.headers()["content-security-policy"], /script-src 'self'/);
    await page.waitForFunction(
      () => window.edgetallyDashboard?.refreshes >= 1 && Object.keys(window.edgetallyDashboard.charts).length === 4,
      null,
      { timeout: 30_000 },
    );
    const d = await page.evaluate(() => window.edgetallyDashboard);
    assert.equal(d.error, null);

    // Each chart's data is /v1/series for the same window and step, point by point.
    for (const [category, chart] of Object.entries(d.charts)) {
      const q = new URLSearchParams({ category, start: chart.start, end: chart.end, step_ms: chart.step_ms });
      const api = await getJson(`${m.http}/v1/series?${q}`);
      assert.deepEqual(chart.t, api.points.map((p) => p.time_window_start / 1000), category);
      assert.deepEqual(chart.count, api.points.map((p) => p.count), category);
      assert.deepEqual(chart.avg, api.points.map((p) => p.avg), category);
      const qs = new URLSearchParams({ category, start: chart.start, end: chart.end, step_ms: chart.step_ms, quantiles: "0.5,0.99" });
      const sk = await getJson(`${m.http}/v1/series?${qs}`);
      assert.deepEqual(chart.distinct, sk.points.map((p) => p.distinct?.estimate ?? null), category);
      assert.deepEqual(chart.p50, sk.points.map((p) => p.quantiles?.values[0].value ?? null), category);
      assert.deepEqual(chart.p99, sk.points.map((p) => p.quantiles?.values[1].value ?? null), category);
      assert.ok(chart.count.some((c) => c > 0), `${category}: a non-empty chart`);
      if (category === "page_view") assert.ok(chart.distinct.some((x) => x > 0), "a distinct line");
      if (category === "temperature") assert.ok(chart.p99.some((x) => x !== null), "a p50–p99 band");
    }
    // The charts are drawn: each canvas has painted pixels.
    const painted = await page.$$eval(".chart canvas", (canvases) =>
      canvases.map((c) => {
        const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) n++;
        return n;
      }),
    );
    assert.equal(painted.length, 4);
    assert.ok(painted.every((n) => n > 500), `painted pixels per chart: ${painted}`);

    // The categories table is /v1/totals by category for the window the page used.
    const rows = await page.$$eval("#categories tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent)));
    const names = rows.map((r) => r[0]).sort();
    assert.deepEqual(names, ["__proto__", "page_view", "temperature", hostile].sort());
    const temp = rows.find((r) => r[0] === "temperature");
    const all = events.filter((e) => e.category === "temperature");
    assert.equal(temp[1], all.length.toLocaleString("en"));
    // The hostile name is text: no element was made from it, no script ran.
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
    assert.equal(await page.$$eval("img", (imgs) => imgs.length), 0);

    // Top entities: /v1/topk for the page's category and window.
    const top = d.topk;
    const q = new URLSearchParams({ category: top.category, start: top.start, end: top.end, k: 10, by: "entity" });
    const api = await getJson(`${m.http}/v1/topk?${q}`);
    const cells = await page.$$eval("#topk tbody tr", (trs) => trs.map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent]));
    assert.deepEqual(cells, api.items.map((r) => [r.key ?? "(no entity)", r.count.toLocaleString("en")]));
    assert.ok(cells.length > 0);

    assert.equal(await page.textContent("#ready"), "ready");
    assert.deepEqual(foreign, [], "nothing loaded from elsewhere");
    assert.deepEqual(problems, [], "no failed request, console error, CSP violation or dialog");
    const dir = join(ROOT, "target", "artifacts");
    mkdirSync(dir, { recursive: true });
    await page.screenshot({ path: join(dir, "dashboard.png"), fullPage: true });
  } finally {
    await browser.close();
    await m.cleanup();
  }
});

test("with read tokens, the page asks for one and then shows the numbers", { timeout: 60_000 }, async () => {
  const m = await startMerger({ env: { EDGETALLY_READ_TOKENS: "s3cret" } });
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS });
  try {
    const page = await browser.newPage();
    await page.goto(`${m.http}/`);
    await page.waitForSelector("#auth:not([hidden])", { timeout: 20_000 });
    await page.fill("#token", "s3cret");
    await page.click("#auth button");
    await page.waitForFunction(
      () => document.querySelector("#ready").textContent === "ready" && document.querySelector("#auth").hidden,
      null,
      { timeout: 20_000 },
    );
  } finally {
    await browser.close();
    await m.cleanup();
  }
});
