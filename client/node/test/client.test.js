'use strict';
// The Node.js client against a running focalserve.
//   FOCALSERVE_TARGET=host:port  the server (tests that need it skip without it)
//   FOCALSERVE_AUTH_TARGET=host:port, FOCALSERVE_AUTH_TOKEN=token   a server that wants that bearer token
//                                (the token tests skip without them)
//   FOCALSERVE_NODE_CASES=file   golden cases as JSON, written by tests/test_node_client.py from the .npz files of
//                                FOCALSERVE_GOLDEN_DIR (the golden tests skip without it)
// Run: npm test   (node --test test/client.test.js test/transport.test.js; Node 21+ takes no bare directory after --test)
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');

const { createClient, buildRequest, decodeTensor, FocalLossError } = require('..');
const { formatG } = require('../example');

const TARGET = process.env.FOCALSERVE_TARGET;
const CASES_FILE = process.env.FOCALSERVE_NODE_CASES;
const CASES = CASES_FILE ? JSON.parse(fs.readFileSync(CASES_FILE, 'utf8')).cases : [];
const FLOAT_TYPES = { float32: Float32Array, float64: Float64Array };
const LABEL_TYPES = { float32: Float32Array, float64: Float64Array, uint8: Uint8Array, int32: Int32Array };

let client = null;
function getClient() {
  if (!client) client = createClient(TARGET, { timeoutMs: 30000 });
  return client;
}
test.after(() => {
  if (client) client.close();
});

/** SPEC §4: float32 rtol=1e-5, atol=1e-6·max|expected|; float64 rtol=1e-10. */
function assertClose(got, expected, dtype, what) {
  assert.equal(got.length, expected.length, `${what}: ${got.length} values, expected ${expected.length}`);
  const maxAbs = expected.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  const [rtol, atol] = dtype === 'float32' ? [1e-5, 1e-6 * maxAbs] : [1e-10, 0];
  for (let i = 0; i < expected.length; i++) {
    const err = Math.abs(got[i] - expected[i]);
    assert.ok(err <= atol + rtol * Math.abs(expected[i]),
      `${what}[${i}]: got ${got[i]}, expected ${expected[i]} (|diff| ${err} > ${atol} + ${rtol}·|expected|)`);
  }
}

const EXAMPLE = {
  logit: new Float32Array([0.97, 0.91, 0.03, 0.55, 0.43, 0.71]),
  label: new Float32Array([1, 0, 0, 0, 1, 0]),
  shape: [2, 3],
  normalizer: 2.0,
  computeGrad: true,
};

test('decodeTensor copies out of a Buffer at any byte offset', () => {
  const values = new Float64Array([1.5, -2.25e-300, 3e300]);
  const backing = Buffer.alloc(values.byteLength + 3);
  Buffer.from(values.buffer).copy(backing, 3);
  const { array, shape } = decodeTensor({ dtype: 'DTYPE_FLOAT64', shape: [3], data: backing.subarray(3) });
  assert.ok(array instanceof Float64Array);
  assert.deepEqual(shape, [3]);
  assert.deepEqual(Array.from(array), Array.from(values));
  const f32 = new Float32Array([0.1, 7]);
  const odd = Buffer.alloc(f32.byteLength + 1);
  Buffer.from(f32.buffer).copy(odd, 1);
  assert.deepEqual(Array.from(decodeTensor({ dtype: 'DTYPE_FLOAT32', shape: [1, 2], data: odd.subarray(1) }).array),
    Array.from(f32));
  assert.equal(formatG(0.6578246402740479), '0.65782464');
  assert.equal(formatG(1.2345678e-5), '1.2345678e-05');
});

test('the README example: loss 0.65782464 and its gradient', async (t) => {
  if (!TARGET) return t.skip('FOCALSERVE_TARGET not set');
  const r = await getClient().compute(EXAMPLE);
  assert.ok(r.loss instanceof Float32Array);
  assert.deepEqual(r.lossShape, []);
  assert.equal(formatG(r.loss[0]), '0.65782464');
  assert.equal(Number(r.loss[0].toPrecision(8)), 0.65782464);
  assert.ok(r.grad instanceof Float32Array);
  assert.deepEqual(r.gradShape, [2, 3]);
  assert.equal(r.backend, 'cpu');
  assert.equal(r.stats.elements, 6);
  assert.equal(r.stats.positives, 2);
  const golden = CASES.find((c) => c.name === 'doc_example');
  if (!golden) return t.skip('FOCALSERVE_NODE_CASES not set: gradient not compared with the golden doc_example');
  assertClose(r.loss, golden.loss, 'float32', 'doc_example loss');
  assertClose(r.grad, golden.grad, 'float32', 'doc_example grad');
});

test('golden cases', async (t) => {
  if (!TARGET) return t.skip('FOCALSERVE_TARGET not set');
  if (!CASES_FILE) return t.skip('FOCALSERVE_NODE_CASES not set');
  assert.ok(CASES.length > 0, `${CASES_FILE} has no cases`);
  for (const c of CASES) {
    await t.test(c.name, async () => {
      const Float = FLOAT_TYPES[c.dtype];
      const request = {
        requestId: c.name,
        logit: Float.from(c.logit),
        label: LABEL_TYPES[c.label_dtype].from(c.label),
        shape: c.shape,
        labelShape: c.label_shape,
        labelFormat: c.label_format,
        alpha: c.alpha,
        gamma: c.gamma,
        reduction: c.reduction,
        computeGrad: true,
      };
      if (c.normalizer !== null) request.normalizer = c.normalizer;
      const r = await getClient().compute(request);
      assert.equal(r.requestId, c.name);
      assert.ok(r.loss instanceof Float, `loss is a ${r.loss.constructor.name}, expected ${Float.name}`);
      assert.ok(r.grad instanceof Float, `grad is a ${r.grad.constructor.name}, expected ${Float.name}`);
      assert.deepEqual(r.lossShape, c.loss_shape);
      assert.deepEqual(r.gradShape, c.shape);
      assertClose(r.loss, c.loss, c.dtype, `${c.name} loss`);
      assertClose(r.grad, c.grad, c.dtype, `${c.name} grad`);
      assert.equal(r.stats.elements, c.logit.length);
    });
  }
});

test('alpha = 2 is INVALID_ARGUMENT naming alpha, with its field violation', async (t) => {
  if (!TARGET) return t.skip('FOCALSERVE_TARGET not set');
  await assert.rejects(getClient().compute({ ...EXAMPLE, alpha: 2 }), (err) => {
    assert.ok(err instanceof FocalLossError);
    assert.equal(err.code, 3);
    assert.equal(err.codeName, 'INVALID_ARGUMENT');
    assert.match(err.details, /alpha/);
    assert.ok(err.violations.some((v) => v.field === 'alpha'), JSON.stringify(err.violations));
    return true;
  });
});

test('class-index labels from an Int32Array, float64, reduction none, no gradient', async (t) => {
  if (!TARGET) return t.skip('FOCALSERVE_TARGET not set');
  const r = await getClient().compute({
    logit: new Float64Array([17, -3, 0.5, 2]), label: new Int32Array([1, -1]), shape: [2, 2], reduction: 'none' });
  assert.ok(r.loss instanceof Float64Array);
  assert.deepEqual(r.lossShape, [2, 2]);
  assert.equal(r.grad, null);
  // row 1 ignored; row 0 column 0 positive at x = 17: α·(1-p)^γ·softplus(-x), about 2e-12 (fg_num 1)
  const q = 1 / (1 + Math.exp(17));
  assertClose([r.loss[0]], [0.25 * q * q * Math.log1p(Math.exp(-17))], 'float64', 'x=17 positive');
  assert.deepEqual(Array.from(r.loss.subarray(2)), [0, 0]);
});

test('serverInfo', async (t) => {
  if (!TARGET) return t.skip('FOCALSERVE_TARGET not set');
  const info = await getClient().serverInfo();
  assert.ok(info.backends.includes('cpu'));
  assert.ok(info.logitDtypes.includes('DTYPE_FLOAT32'));
  assert.equal(typeof info.maxMessageBytes, 'number');
});

test('token: a server that wants one refuses a call without it or with another, and answers with it', async (t) => {
  const target = process.env.FOCALSERVE_AUTH_TARGET;
  const token = process.env.FOCALSERVE_AUTH_TOKEN;
  if (!target || !token) return t.skip('FOCALSERVE_AUTH_TARGET / FOCALSERVE_AUTH_TOKEN not set');
  for (const given of [undefined, `${token}x`]) {
    const refused = createClient(target, { timeoutMs: 30000, token: given });
    try {
      await assert.rejects(refused.compute(EXAMPLE), (err) => {
        assert.ok(err instanceof FocalLossError);
        assert.equal(err.codeName, 'UNAUTHENTICATED');
        return true;
      });
    } finally {
      refused.close();
    }
  }
  const client = createClient(target, { timeoutMs: 30000, token });
  try {
    const r = await client.compute(EXAMPLE);
    assert.equal(formatG(r.loss[0]), '0.65782464');
    assert.ok((await client.serverInfo()).backends.length > 0);
  } finally {
    client.close();
  }
});

test('0/1 float labels travel as UINT8, int64 class indices as INT32: the server computes the same bits', async (t) => {
  if (!TARGET) return t.skip('FOCALSERVE_TARGET not set');
  const n = 5000;
  for (const [Float, Label] of [[Float32Array, Float32Array], [Float64Array, Float64Array], [Float32Array, Float64Array]]) {
    const logit = Float.from({ length: n }, (_, i) => 20 * Math.sin(i * 0.37));
    const label = Label.from({ length: n }, (_, i) => (i % 7 === 0 || i % 11 === 0 ? 1 : 0));
    assert.equal(buildRequest({ logit, label }).label.dtype, 'DTYPE_UINT8');
    assert.equal(buildRequest({ logit, label, narrowLabels: false }).label.dtype,
      Label === Float32Array ? 'DTYPE_FLOAT32' : 'DTYPE_FLOAT64');
    for (const reduction of ['none', 'sum']) {
      const args = { logit, label, reduction, computeGrad: true, gamma: 1.5, alpha: 0.3 };
      const narrow = await getClient().compute(args);
      const wide = await getClient().compute({ ...args, narrowLabels: false });
      const bits = (a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
      assert.ok(bits(narrow.loss).equals(bits(wide.loss)), `${Float.name}/${Label.name} ${reduction}: loss differs`);
      assert.ok(bits(narrow.grad).equals(bits(wide.grad)), `${Float.name}/${Label.name} ${reduction}: grad differs`);
      assert.equal(narrow.stats.positives, wide.stats.positives);
    }
  }
  // class-index labels held as BigInt64Array travel as INT32
  const logit = Float64Array.from({ length: 300 }, (_, i) => 9 * Math.cos(i));
  const label = BigInt64Array.from({ length: 100 }, (_, i) => BigInt((i % 5) - 1));
  const args = { logit, label, shape: [100, 3], reduction: 'none', computeGrad: true };
  assert.equal(buildRequest(args).label.dtype, 'DTYPE_INT32');
  const narrow = await getClient().compute(args);
  const wide = await getClient().compute({ ...args, narrowLabels: false });
  assert.deepEqual(Buffer.from(narrow.loss.buffer), Buffer.from(wide.loss.buffer));
  assert.deepEqual(Buffer.from(narrow.grad.buffer), Buffer.from(wide.grad.buffer));
});
