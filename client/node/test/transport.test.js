'use strict';
// The client's transport against an in-process grpc-js server that plays focalserve's part where the real one
// cannot be made to: refusing a first attempt (CANCELLED as a draining server does, UNAVAILABLE), and
// refusing with google.rpc.ErrorInfo / BadRequest details. Also: the hand-written request encoder against
// protobufjs's own encoder and decoder. Needs no running focalserve.
const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');

const { createClient, buildRequest, encodeRequest, decodeStatusDetails, contract, FocalLossError } = require('..');

const MiB = 1024 * 1024;

/**
 * A grpc-js server with FocalLossService's Compute: `reply(call, attempt)` answers each attempt ({error} or
 * nothing for a success echoing a float32 loss). Records each attempt's request and metadata.
 */
async function fakeServer(reply) {
  const server = new grpc.Server({ 'grpc.max_receive_message_length': 64 * MiB });
  const seen = [];
  const { Service } = contract();
  server.addService(Service.service, {
    Compute(call, callback) {
      seen.push({ request: call.request, metadata: call.metadata });
      const answer = reply(call, seen.length) || {};
      if (answer.error) return callback(answer.error);
      return callback(null, { requestId: call.request.requestId, backend: 'fake',
        loss: { dtype: 'DTYPE_FLOAT32', shape: [], data: Buffer.from(new Float32Array([seen.length]).buffer) } });
    },
    ComputeStream(call) { call.end(); },
    GetServerInfo(call, callback) { callback(null, {}); },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  return { target: `127.0.0.1:${port}`, seen, close: () => server.forceShutdown() };
}

function batch(n) {
  const logit = new Float32Array(n);
  const label = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    logit[i] = Math.sin(i);
    label[i] = i % 3 === 0 ? 1 : 0;
  }
  return { logit, label };
}

async function computeOnce(reply, args, options = {}) {
  const server = await fakeServer(reply);
  const client = createClient(server.target, { timeoutMs: 20000, ...options });
  try {
    return { result: await client.compute(args), seen: server.seen };
  } catch (err) {
    return { error: err, seen: server.seen };
  } finally {
    client.close();
    server.close();
  }
}

const refuseFirst = (code) => (call, attempt) => (attempt === 1 ? { error: { code, details: 'first attempt refused' } } : null);

test('CANCELLED by the server is retried, as the Python client does (a draining server cancels unstarted calls)', async () => {
  const { result, error, seen } = await computeOnce(refuseFirst(grpc.status.CANCELLED), { ...batch(16), computeGrad: true });
  assert.equal(error, undefined, error && error.message);
  assert.equal(seen.length, 2);
  assert.equal(result.loss[0], 2); // the second attempt's answer
});

test('a 2 MiB request is retried: the per-call retry buffer holds it (grpc-js holds 1 MiB by default)', async () => {
  const { logit, label } = batch(MiB / 4 + 1000);
  // float32 labels as they are (not narrowed to UINT8): 8 B an element
  const { error, seen } = await computeOnce(refuseFirst(grpc.status.UNAVAILABLE), { logit, label, narrowLabels: false });
  assert.equal(error, undefined, error && error.message);
  assert.equal(seen.length, 2);
  assert.deepEqual(seen[1].request.logit.data, seen[0].request.logit.data);
  assert.equal(seen[1].request.logit.data.length, logit.byteLength);
});

test('a 24 MiB request is retried: the channel-wide retry buffer holds it (grpc-js holds 16 MiB by default)', async () => {
  const { logit, label } = batch(3 * MiB);
  const { error, seen } = await computeOnce(refuseFirst(grpc.status.UNAVAILABLE), { logit, label, narrowLabels: false });
  assert.equal(error, undefined, error && error.message);
  assert.equal(seen.length, 2);
  assert.equal(seen[1].request.label.data.length, label.byteLength);
  assert.ok(Buffer.from(logit.buffer).equals(seen[1].request.logit.data));
});

test('the HTTP/2 receive window the client announces is 64 MiB (Node\'s 65,535 B default halves large responses)', async () => {
  // a bare HTTP/2 server reads the SETTINGS the client's connection opens with; the call itself then fails
  const http2 = require('node:http2');
  const announced = [];
  const sessions = [];
  const server = http2.createServer();
  server.on('session', (session) => {
    sessions.push(session);
    session.on('remoteSettings', (s) => announced.push(s.initialWindowSize));
  });
  server.on('stream', (stream) => stream.respond(  // a trailers-only gRPC answer: UNIMPLEMENTED
    { ':status': 200, 'content-type': 'application/grpc', 'grpc-status': '12', 'grpc-message': 'probe' },
    { endStream: true }));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const target = `127.0.0.1:${server.address().port}`;
  for (const [options, expected] of [[{}, 64 * MiB], [{ flowControlWindowBytes: 8 * MiB }, 8 * MiB]]) {
    const client = createClient(target, { maxAttempts: 1, timeoutMs: 5000, ...options });
    await assert.rejects(client.compute(batch(4)), (e) => e.code === grpc.status.UNIMPLEMENTED);
    client.close();
    assert.equal(announced.at(-1), expected);
  }
  for (const session of sessions) session.destroy();
  await new Promise((resolve) => server.close(resolve));
});

test('other refusals are not retried, and maxAttempts bounds the retries', async () => {
  const invalid = await computeOnce(() => ({ error: { code: grpc.status.INVALID_ARGUMENT, details: 'alpha: no' } }),
    batch(4));
  assert.equal(invalid.seen.length, 1);
  assert.equal(invalid.error.code, grpc.status.INVALID_ARGUMENT);
  const always = await computeOnce(() => ({ error: { code: grpc.status.UNAVAILABLE, details: 'draining' } }),
    batch(4), { maxAttempts: 3 });
  assert.equal(always.seen.length, 3);
  assert.equal(always.error.codeName, 'UNAVAILABLE');
});

test('token: every call carries authorization: Bearer <token>; none without one', async () => {
  const withToken = await computeOnce(() => null, batch(4), { token: 's3cret' });
  assert.deepEqual(withToken.seen[0].metadata.get('authorization'), ['Bearer s3cret']);
  const without = await computeOnce(() => null, batch(4));
  assert.deepEqual(without.seen[0].metadata.get('authorization'), []);
  assert.throws(() => createClient('127.0.0.1:1', { token: 'a\nb' }), /token/);
});

/** A `grpc-status-details-bin` value: google.rpc.Status with the given details (ErrorInfo, BadRequest). */
function statusDetails(code, message, { errorInfo, violations }) {
  const { Status, ErrorInfo, BadRequest } = contract();
  // protobufjs's bundled google/protobuf/any.proto names the field type_url, as the .proto does
  const details = [];
  if (errorInfo) {
    details.push({ type_url: 'type.googleapis.com/google.rpc.ErrorInfo', value: ErrorInfo.encode(errorInfo).finish() });
  }
  if (violations) {
    details.push({ type_url: 'type.googleapis.com/google.rpc.BadRequest',
      value: BadRequest.encode({ fieldViolations: violations }).finish() });
  }
  return Buffer.from(Status.encode({ code, message, details }).finish());
}

test('the refusal cause: google.rpc.ErrorInfo (reason, domain, metadata) and BadRequest violations on the error', async () => {
  const trailer = new grpc.Metadata();
  trailer.set('grpc-status-details-bin', statusDetails(grpc.status.RESOURCE_EXHAUSTED, 'logit: too large', {
    errorInfo: { reason: 'MESSAGE_TOO_LARGE', domain: 'focalserve', metadata: { limit_bytes: '1024', field: 'logit' } },
    violations: [{ field: 'logit', description: 'too large', reason: 'TOO_LARGE' }],
  }));
  const { error, seen } = await computeOnce(() => ({ error: { code: grpc.status.RESOURCE_EXHAUSTED,
    details: 'logit: too large', metadata: trailer } }), batch(4));
  assert.equal(seen.length, 1);
  assert.ok(error instanceof FocalLossError);
  assert.equal(error.codeName, 'RESOURCE_EXHAUSTED');
  assert.equal(error.reason, 'MESSAGE_TOO_LARGE');
  assert.equal(error.domain, 'focalserve');
  assert.deepEqual(error.errorMetadata, { limit_bytes: '1024', field: 'logit' });
  assert.deepEqual(error.errorInfo, { reason: 'MESSAGE_TOO_LARGE', domain: 'focalserve',
    metadata: { limit_bytes: '1024', field: 'logit' } });
  assert.deepEqual(error.violations, [{ field: 'logit', description: 'too large', reason: 'TOO_LARGE' }]);
});

test('decodeStatusDetails: no trailer, or a malformed one, gives no cause', () => {
  assert.deepEqual(decodeStatusDetails(new grpc.Metadata()), { violations: [], errorInfo: null });
  const bad = new grpc.Metadata();
  bad.set('grpc-status-details-bin', Buffer.from([0x0a, 0xff, 0xff]));
  assert.deepEqual(decodeStatusDetails(bad), { violations: [], errorInfo: null });
  assert.deepEqual(decodeStatusDetails(null), { violations: [], errorInfo: null });
  const ok = new grpc.Metadata();
  ok.set('grpc-status-details-bin', statusDetails(16, 'no token', { errorInfo: { reason: 'TOKEN_MISSING',
    domain: 'focalserve' } }));
  assert.deepEqual(decodeStatusDetails(ok), { violations: [],
    errorInfo: { reason: 'TOKEN_MISSING', domain: 'focalserve', metadata: {} } });
});

const TO_OBJECT = { longs: Number, enums: String, bytes: Array, defaults: true, oneofs: true };

test('encodeRequest writes what protobufjs reads as the same message, optional fields set or not', () => {
  const { ComputeRequest } = contract();
  const cases = [
    { logit: new Float32Array([0.5, -1, 2, 3e38, -0, 7, 1e-3, 2]), label: new Uint8Array([1, 0, 0, 1, 0, 0, 1, 1]),
      shape: [2, 4], computeGrad: true },
    { logit: new Float64Array(300).fill(-2.5), label: new Int32Array(100).fill(3), shape: [100, 3],
      alpha: 0, gamma: 0.5, normalizer: 1e-300, reduction: 'none', backend: 'cpu', requestId: 'r-é-∑' },
    { logit: new Float32Array(0), label: new Float32Array(0), shape: [0, 5], reduction: 'mean', gradOutput: 2.5,
      alpha: 1, requestId: 'x'.repeat(300) },
    { logit: new Float64Array([1, 2, 3]), label: new Float64Array([1, 0, -100]), reduction: 'none',
      gradOutput: new Float64Array([1, -1, 0.25]), labelFormat: 'dense', backend: 'gpu', computeGrad: true },
    { logit: new Float32Array(200 * 129).fill(1), label: new Float32Array(200 * 129), shape: [200, 129],
      normalizer: 3 },
  ];
  for (const args of cases) {
    const request = buildRequest(args);
    const mine = encodeRequest(request);
    const theirs = ComputeRequest.encode(ComputeRequest.fromObject(request)).finish();
    const a = ComputeRequest.toObject(ComputeRequest.decode(mine), TO_OBJECT);
    const b = ComputeRequest.toObject(ComputeRequest.decode(theirs), TO_OBJECT);
    assert.deepEqual(a, b);
    assert.deepEqual(a.logit.data, Array.from(new Uint8Array(args.logit.buffer)));
    for (const key of ['alpha', 'gamma', 'normalizer']) {
      assert.equal(Object.hasOwn(a, key), args[key] !== undefined, `${key} present iff given`);
    }
    // nothing but the fields: re-encoding protobufjs's reading of it gives as many bytes, less its zero scalars
    assert.ok(mine.length <= theirs.length, `${mine.length} > ${theirs.length}`);
  }
});

test('encodeRequest: the request is one buffer holding a copy of each array (the caller may reuse its arrays)', () => {
  const logit = new Float32Array([1, 2, 3, 4]);
  const label = new Float32Array([1, 0, 1, 0]);
  const bytes = encodeRequest(buildRequest({ logit, label }));
  logit[0] = 99;
  const { ComputeRequest } = contract();
  const decoded = ComputeRequest.decode(bytes);
  assert.equal(new Float32Array(new Uint8Array(decoded.logit.data).buffer)[0], 1);
});

test('labels other than exactly 0 and 1 keep their float dtype (soft, ignored -100, -0, NaN), integers too', () => {
  const keep = (label, dtype) => assert.equal(buildRequest({ logit: new Float32Array(label.length), label }).label.dtype, dtype);
  keep(new Float32Array([0, 1, 0.5]), 'DTYPE_FLOAT32');
  keep(new Float32Array([1, -100, 0]), 'DTYPE_FLOAT32');
  keep(new Float32Array([1, -0, 0]), 'DTYPE_FLOAT32');
  keep(new Float32Array([NaN, 1]), 'DTYPE_FLOAT32');
  keep(new Float64Array([1, 1 + 2 ** -52]), 'DTYPE_FLOAT64');
  keep(new Float64Array([0, 2 ** -1074]), 'DTYPE_FLOAT64');
  keep(new Float64Array([0, 1, 1, 0]), 'DTYPE_UINT8');
  keep(new Float32Array([]), 'DTYPE_UINT8');
  const r = buildRequest({ logit: new Float32Array(3), label: new Float64Array([1, 0, 1]) });
  assert.deepEqual(Array.from(r.label.data), [1, 0, 1]);
});

test('BigInt64Array class-index labels travel as INT32 where every one fits', () => {
  const logit = new Float32Array(6);
  const fits = buildRequest({ logit, label: BigInt64Array.from([1n, -1n, 0n]), shape: [3, 2] }).label;
  assert.equal(fits.dtype, 'DTYPE_INT32');
  assert.deepEqual(Array.from(new Int32Array(new Uint8Array(fits.data).buffer)), [1, -1, 0]);
  const big = BigInt64Array.from([1n, 2n ** 31n, 0n]);
  assert.equal(buildRequest({ logit, label: big, shape: [3, 2] }).label.dtype, 'DTYPE_INT64');
  assert.equal(buildRequest({ logit, label: BigInt64Array.from([1n, 0n, 0n]), shape: [3, 2], narrowLabels: false })
    .label.dtype, 'DTYPE_INT64');
});
