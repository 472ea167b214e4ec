'use strict';
// The README's example: the sigmoid focal loss of two rows of three logits, and its gradient.
//   node example.js [host:port]       (default: $FOCALSERVE_TARGET, else localhost:50051)
const { createClient } = require('./index');

/** `x` formatted as Python's f"{x:.{digits}g}" (e.g. 0.65782464, 1.2345e-05, 1e+10). */
function formatG(x, digits = 8) {
  if (Number.isNaN(x)) return 'nan';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  if (x === 0) return Object.is(x, -0) ? '-0' : '0';
  const [mantissa, exp] = x.toExponential(digits - 1).split('e');
  const e = Number(exp);
  const strip = (s) => (s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s);
  if (e < -4 || e >= digits) {
    return `${strip(mantissa)}e${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`;
  }
  return strip(x.toFixed(digits - 1 - e));
}

async function main() {
  const target = process.argv[2] || process.env.FOCALSERVE_TARGET || 'localhost:50051';
  const client = createClient(target, { timeoutMs: 30000 });
  try {
    const r = await client.compute({
      logit: new Float32Array([0.97, 0.91, 0.03, 0.55, 0.43, 0.71]),
      label: new Float32Array([1, 0, 0, 0, 1, 0]),
      shape: [2, 3],
      normalizer: 2.0, // reduction defaults to SUM, alpha to 0.25, gamma to 2.0
      computeGrad: true,
    });
    console.log(`loss ${formatG(r.loss[0])}`); // loss 0.65782464
    const [rows, cols] = r.gradShape;
    const grad = [];
    for (let i = 0; i < rows; i++) {
      grad.push(`[${Array.from(r.grad.subarray(i * cols, (i + 1) * cols), (g) => formatG(g)).join(', ')}]`);
    }
    console.log(`grad [${grad.join(', ')}]`);
    console.log(`backend ${r.backend}, ${r.stats.elements} elements`);
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main().catch((err) => {
    console.error(err.message);
    process.exitCode = 1;
  });
}

module.exports = { formatG };
