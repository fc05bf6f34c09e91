// The SDK in Deno:
//   deno run --config examples/deno/deno.json --allow-net=127.0.0.1 --allow-read=web \
//     examples/deno/record.ts [http://127.0.0.1:7070]
// (build the package first: `cargo xtask web`; deno.json maps "edgetally" to web/).
import { Producer } from "edgetally";
import { runWorkload } from "../js/workload.mjs";

const endpoint = Deno.args[0] ?? "http://127.0.0.1:7070";
const { base, stats } = await runWorkload(Producer, endpoint);
console.log(JSON.stringify({ runtime: `deno ${Deno.version.deno}`, base, stats }));
