'use strict';
// Throughput of the public Node.js client (client/node): float32 logits and float32 0/1 labels, as a framework
// hands them over, through createClient().compute(), against a running focalserve.
//
//   node benchmarks/node_client.js --target HOST:PORT --elements N --repeat R [--no-grad]
//
// Prints ONE JSON line: {"elements_per_s": <median over the R timed calls>, "elements": N, "repeat": R}
// (benchmarks/client.py reads it). One untimed call first warms the channel and the server. Needs
// client/node/node_modules (`npm ci` in client/node).
const path = require('path');

const { createClient } = require(path.join(__dirname, '..', 'client', 'node'));

function usage(message) {
  process.stderr.write(`${message}\nusage: node benchmarks/node_client.js --target HOST:PORT --elements N ` +
    '--repeat R [--no-grad]\n');
  process.exit(2);
}

function parseArgs(argv) {
  const args = { target: null, elements: null, repeat: null, grad: true };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--no-grad') { args.grad = false; continue; }
    if (!['--target', '--elements', '--repeat'].includes(a)) usage(`unknown argument ${JSON.stringify(a)}`);
    const value = argv[++i];
    if (value === undefined) usage(`${a} needs a value`);
    if (a === '--target') args.target = value;
    else {
      const n = Number(value);
      if (!Number.isSafeInteger(n) || n < 1) usage(`${a} must be a positive integer, got ${JSON.stringify(value)}`);
      args[a.slice(2)] = n;
    }
  }
  if (!args.target || !args.elements || !args.repeat) usage('--target, --elements and --repeat are required');
  return args;
}

/** Logits ~ N(0, 2) and labels 0/1 (about 1 in 4 positive), from a fixed-seed generator. */
function batch(n) {
  let state = 0x9e3779b9;
  const uniform = () => {
    // xorshift32: deterministic and fast enough to fill 16M elements
    state ^= state << 13; state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5; state >>>= 0;
    return (state + 0.5) / 4294967296;
  };
  const logit = new Float32Array(n);
  const label = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    logit[i] = 2 * Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
    label[i] = uniform() < 0.25 ? 1 : 0;
  }
  return { logit, label };
}

function median(values) {
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { logit, label } = batch(args.elements);
  // the reply of a float32 request with a gradient is about 4 B per element; leave room for both directions
  const maxMessageBytes = Math.max(256 * 1024 * 1024, 16 * args.elements + (1 << 20));
  const client = createClient(args.target, { timeoutMs: 600000, maxMessageBytes });
  try {
    const request = { logit, label, computeGrad: args.grad };
    const check = await client.compute(request);
    if (args.grad && (!check.grad || check.grad.length !== args.elements)) {
      throw new Error(`expected a gradient of ${args.elements} elements`);
    }
    const rates = [];
    for (let i = 0; i < args.repeat; i++) {
      const start = process.hrtime.bigint();
      await client.compute(request);
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      rates.push(args.elements / seconds);
    }
    process.stdout.write(`${JSON.stringify({ elements_per_s: median(rates), elements: args.elements,
      repeat: args.repeat })}\n`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
