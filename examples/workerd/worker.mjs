// The SDK in a Cloudflare Worker (workerd): GET /?endpoint=http://127.0.0.1:7070 records the
// workload, flushes and answers with the producer's stats. Run with
//   npx workerd serve examples/workerd/config.capnp   (from web/, after `cargo xtask web`)
import { Producer } from "edgetally";
import { runWorkload } from "./workload.mjs";

export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname !== "/") return new Response("not found", { status: 404 });
    const endpoint = url.searchParams.get("endpoint") ?? "http://127.0.0.1:7070";
    try {
      const { base, stats } = await runWorkload(Producer, endpoint);
      return Response.json({ runtime: "workerd", base, stats });
    } catch (e) {
      return Response.json({ error: String(e?.code ?? e), message: String(e?.message ?? e) }, { status: 500 });
    }
  },
};
