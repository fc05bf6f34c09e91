// The SDK in a Cloudflare Worker (workerd): GET /?endpoint=http://127.0.0.1:7070 records the
// workload, flushes and answers with the producer's stats. GET /fire?endpoint=…&n=…&category=…
// shows the usual pattern: record, answer at once, and let `ctx.waitUntil(producer.flush())`
// deliver after the response (workerd keeps the request's I/O alive until it settles). Run with
//   npx workerd serve examples/workerd/config.capnp   (from web/, after `cargo xtask web`)
import { Producer } from "edgetally";
import { runWorkload } from "./workload.mjs";

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    const endpoint = url.searchParams.get("endpoint") ?? "http://127.0.0.1:7070";
    if (url.pathname === "/fire") {
      const n = Number(url.searchParams.get("n") ?? "1");
      const producer = await Producer.create({ endpoints: [endpoint] });
      for (let i = 0; i < n; i++) producer.record(url.searchParams.get("category") ?? "fired", i % 7);
      // The response goes now; the batches after it.
      ctx.waitUntil(producer.flush().finally(() => producer.close()));
      return Response.json({ runtime: "workerd", recorded: n });
    }
    if (url.pathname !== "/") return new Response("not found", { status: 404 });
    try {
      const { base, stats } = await runWorkload(Producer, endpoint);
      return Response.json({ runtime: "workerd", base, stats });
    } catch (e) {
      return Response.json({ error: String(e?.code ?? e), message: String(e?.message ?? e) }, { status: 500 });
    }
  },
};
