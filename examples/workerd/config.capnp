# workerd configuration for the example worker. Module names are paths, so the package's
# relative imports resolve as they would from node_modules; a bundler (wrangler) does the
# same from `import { Producer } from "edgetally"` using the package's "workerd" export.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "main", worker = .worker),
    # The merger in the example runs on loopback, which the default outbound refuses.
    (name = "net", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [(name = "http", address = "127.0.0.1:8787", http = (), service = "main")],
);

const worker :Workerd.Worker = (
  modules = [
    (name = "worker.mjs", esModule = embed "worker.mjs"),
    (name = "workload.mjs", esModule = embed "../js/workload.mjs"),
    (name = "edgetally", esModule = "export * from \"./node_modules/edgetally/dist/workerd.js\";"),
    (name = "node_modules/edgetally/dist/workerd.js", esModule = embed "../../web/dist/workerd.js"),
    (name = "node_modules/edgetally/dist/producer.js", esModule = embed "../../web/dist/producer.js"),
    (name = "node_modules/edgetally/dist/clock.js", esModule = embed "../../web/dist/clock.js"),
    (name = "node_modules/edgetally/dist/errors.js", esModule = embed "../../web/dist/errors.js"),
    (name = "node_modules/edgetally/dist/handle.js", esModule = embed "../../web/dist/handle.js"),
    (name = "node_modules/edgetally/dist/signer.js", esModule = embed "../../web/dist/signer.js"),
    (name = "node_modules/edgetally/dist/store.js", esModule = embed "../../web/dist/store.js"),
    (name = "node_modules/edgetally/dist/transport.js", esModule = embed "../../web/dist/transport.js"),
    (name = "node_modules/edgetally/dist/wasm.js", esModule = embed "../../web/dist/wasm.js"),
    (name = "node_modules/edgetally/dist/webtransport.js", esModule = embed "../../web/dist/webtransport.js"),
    (name = "node_modules/edgetally/pkg/edgetally_wasm.js", esModule = embed "../../web/pkg/edgetally_wasm.js"),
    (name = "node_modules/edgetally/pkg/edgetally_wasm_bg.wasm", wasm = embed "../../web/pkg/edgetally_wasm_bg.wasm"),
  ],
  compatibilityDate = "2025-09-01",
  globalOutbound = "net",
);
