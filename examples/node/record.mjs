// The SDK in Node: `node examples/node/record.mjs [http://127.0.0.1:7070]`
// (build the package first: `cargo xtask web`).
import { Producer } from "edgetally";
import { runWorkload } from "../js/workload.mjs";

const endpoint = process.argv[2] ?? "http://127.0.0.1:7070";
const { base, stats } = await runWorkload(Producer, endpoint);
console.log(JSON.stringify({ runtime: `node ${process.version}`, base, stats }));
