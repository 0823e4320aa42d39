// No-op worker of `capibara-bench sdk`: the TypeScript SDK's `Worker` with one handler that
// returns its input. CAPIBARA_URL and CAPIBARA_API_KEY come from the environment:
//
//     node typescript_noop.mjs --kind bench.noop-typescript --concurrency 32
//
// It prints `bench-driver ready <worker id>` once registered and runs until SIGTERM or SIGINT.
// The SDK is used as documented, with its defaults (30 s long polls).

import { parseArgs } from "node:util";
import { Client, Worker } from "../../sdk/typescript/src/index.js";

const { values } = parseArgs({
  options: {
    kind: { type: "string" },
    concurrency: { type: "string", default: "32" },
  },
});
if (!values.kind) {
  console.error("--kind is required");
  process.exit(2);
}

const worker = new Worker({
  client: new Client(),
  concurrency: Number(values.concurrency),
  name: `bench-typescript-${process.pid}`,
});
worker.handle(values.kind, async (job) => job.input);

const done = worker.run();
worker.start().then((r) => console.log(`bench-driver ready ${r.id}`));
await done;
console.log("bench-driver stopped");
