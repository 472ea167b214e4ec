'use strict';
// focalserve-client: a Node.js client of focalserve (SPEC §2), the sigmoid focal loss and its gradient over gRPC.
//
//   const { createClient } = require('focalserve-client');
//   const client = createClient('localhost:50051');
//   const r = await client.compute({ logit: new Float32Array([...]), label: new Float32Array([...]),
//                                    shape: [2, 3], normalizer: 2.0, computeGrad: true });
//   r.loss, r.lossShape, r.grad, r.gradShape, r.backend, r.stats
//   client.close();
//
// The contract is ../../proto/focalloss/v1/focal_loss.proto, loaded at run time; the google/rpc/status.proto it
// imports ships in ./protos (google/protobuf/any.proto comes with proto-loader).

const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_DIR = path.join(__dirname, '../../proto');
const VENDORED_PROTO_DIR = path.join(__dirname, 'protos');
const PROTO_FILE = 'focalloss/v1/focal_loss.proto';
const SERVICE = 'focalloss.v1.FocalLossService';
const DEFAULT_TIMEOUT_MS = 60000;
const DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024;
const LITTLE_ENDIAN = os.endianness() === 'LE';

const LOADER_OPTIONS = {
  includeDirs: [PROTO_DIR, VENDORED_PROTO_DIR],
  keepCase: false, // camelCase field names: labelFormat, computeGrad, gradOutput, ...
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};

// dtype name -> typed array constructor and item size (the ones a JS caller can hold without conversion)
const DTYPES = {
  DTYPE_FLOAT32: { ctor: Float32Array, size: 4 },
  DTYPE_FLOAT64: { ctor: Float64Array, size: 8 },
  DTYPE_INT32: { ctor: Int32Array, size: 4 },
  DTYPE_INT64: { ctor: BigInt64Array, size: 8 },
  DTYPE_UINT8: { ctor: Uint8Array, size: 1 },
};
const LOGIT_DTYPES = new Map([[Float32Array, 'DTYPE_FLOAT32'], [Float64Array, 'DTYPE_FLOAT64']]);
const DENSE_LABEL_DTYPES = new Map([
  [Float32Array, 'DTYPE_FLOAT32'], [Float64Array, 'DTYPE_FLOAT64'], [Uint8Array, 'DTYPE_UINT8']]);
const CLASS_INDEX_LABEL_DTYPES = new Map([[Int32Array, 'DTYPE_INT32'], [BigInt64Array, 'DTYPE_INT64']]);

const LABEL_FORMATS = { dense: 'LABEL_FORMAT_DENSE', class_index: 'LABEL_FORMAT_CLASS_INDEX',
  'class-index': 'LABEL_FORMAT_CLASS_INDEX', classindex: 'LABEL_FORMAT_CLASS_INDEX' };
const REDUCTIONS = { none: 'REDUCTION_NONE', mean: 'REDUCTION_MEAN', sum: 'REDUCTION_SUM' };
const BACKENDS = { auto: 'BACKEND_AUTO', cpu: 'BACKEND_CPU', gpu: 'BACKEND_GPU' };
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

let cached = null;

/** The loaded contract: the service constructor and the google.rpc types used to decode error details. */
function contract() {
  if (cached) return cached;
  const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
  const loaded = grpc.loadPackageDefinition(definition);
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) =>
    (path.isAbsolute(target) ? target : path.join(VENDORED_PROTO_DIR, target));
  root.loadSync('google/rpc/status.proto', { keepCase: false });
  // google.rpc.BadRequest as google/rpc/error_details.proto defines it (field names and numbers).
  protobuf.parse(`syntax = "proto3"; package google.rpc;
    message BadRequest {
      message FieldViolation { string field = 1; string description = 2; string reason = 3;
                               LocalizedMessage localized_message = 4; }
      repeated FieldViolation field_violations = 1; }
    message LocalizedMessage { string locale = 1; string message = 2; }`, root, { keepCase: false });
  root.resolveAll();
  cached = {
    Service: loaded.focalloss.v1.FocalLossService,
    Status: root.lookupType('google.rpc.Status'),
    BadRequest: root.lookupType('google.rpc.BadRequest'),
  };
  return cached;
}

/** A refused or failed call: `code` (grpc status number), `codeName`, `details`, `violations` [{field, description}]. */
class FocalLossError extends Error {
  constructor(code, details, { violations = [], metadata = null, requestId = '' } = {}) {
    const codeName = STATUS_NAMES[code] || String(code);
    super(`${codeName}: ${details}`);
    this.name = 'FocalLossError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.violations = violations;
    this.metadata = metadata;
    this.requestId = requestId;
  }
}

/** The google.rpc.BadRequest field violations in a `grpc-status-details-bin` trailer ([] when none). */
function decodeViolations(metadata) {
  const values = metadata && typeof metadata.get === 'function' ? metadata.get('grpc-status-details-bin') : [];
  const violations = [];
  if (!values || values.length === 0) return violations;
  const { Status, BadRequest } = contract();
  try {
    const status = Status.decode(Buffer.isBuffer(values[0]) ? values[0] : Buffer.from(values[0], 'base64'));
    for (const any of status.details || []) {
      // protobufjs's bundled google/protobuf/any.proto keeps the proto field name type_url
      const typeUrl = String(any.typeUrl || any.type_url || '');
      if (!typeUrl.endsWith('/google.rpc.BadRequest')) continue;
      for (const v of BadRequest.decode(any.value).fieldViolations) {
        violations.push({ field: v.field, description: v.description });
      }
    }
  } catch (_) {
    // a malformed trailer leaves the status code and details, which are what matter
  }
  return violations;
}

function toFocalLossError(err, requestId) {
  if (err instanceof FocalLossError) return err;
  if (err && typeof err.code === 'number') {
    return new FocalLossError(err.code, err.details !== undefined ? err.details : err.message, {
      violations: decodeViolations(err.metadata), metadata: err.metadata || null, requestId });
  }
  return err;
}

function invalid(details) {
  return new FocalLossError(grpc.status.INVALID_ARGUMENT, details);
}

function enumValue(value, table, field) {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'number') return value;
  const key = String(value);
  const name = table[key.toLowerCase()] || (Object.values(table).includes(key) ? key : undefined);
  if (!name) throw invalid(`${field}: unknown value ${JSON.stringify(value)} (one of ${Object.keys(table).join(', ')})`);
  return name;
}

function numel(shape) {
  return shape.reduce((n, d) => n * d, 1);
}

function checkShape(shape, field) {
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw invalid(`${field}: must be an array of non-negative integers, got ${JSON.stringify(shape)}`);
  }
  return shape;
}

/** Little-endian bytes of a typed array: a view where the host is little-endian, a byte-swapped copy elsewhere. */
function leBytes(array) {
  const bytes = Buffer.from(array.buffer, array.byteOffset, array.byteLength);
  if (LITTLE_ENDIAN || array.BYTES_PER_ELEMENT === 1) return bytes;
  const copy = Buffer.from(bytes);
  if (array.BYTES_PER_ELEMENT === 4) copy.swap32(); else copy.swap64();
  return copy;
}

/** A Tensor message from a typed array with the given dtype name and shape. */
function encodeTensor(array, dtype, shape, field) {
  checkShape(shape, `${field}.shape`);
  if (numel(shape) !== array.length) {
    throw invalid(`${field}: ${array.length} elements do not fill shape ${JSON.stringify(shape)}`);
  }
  return { dtype, shape, data: leBytes(array) };
}

/**
 * A Tensor message (`{dtype, shape, data}` with `data` a Buffer) as `{array, shape}`: a fresh typed array of its
 * dtype. The bytes are copied, so a Buffer at any byteOffset (not a multiple of 4 or 8) decodes correctly.
 */
function decodeTensor(tensor, field = 'tensor') {
  const info = DTYPES[tensor.dtype];
  if (!info) throw new FocalLossError(grpc.status.INTERNAL, `${field}: unsupported dtype ${tensor.dtype}`);
  const shape = (tensor.shape || []).map(Number);
  const n = numel(shape);
  const data = tensor.data || Buffer.alloc(0);
  if (data.length !== n * info.size) {
    throw new FocalLossError(grpc.status.INTERNAL,
      `${field}: ${data.length} bytes for shape ${JSON.stringify(shape)} of ${tensor.dtype}`);
  }
  const array = new info.ctor(n);
  const out = new Uint8Array(array.buffer);
  out.set(data);
  if (!LITTLE_ENDIAN && info.size > 1) {
    const b = Buffer.from(array.buffer);
    if (info.size === 4) b.swap32(); else b.swap64();
  }
  return { array, shape };
}

function floatTypeFor(dtype) {
  return dtype === 'DTYPE_FLOAT64' ? Float64Array : Float32Array;
}

/** The ComputeRequest message for compute()'s arguments (throws FocalLossError INVALID_ARGUMENT on misuse). */
function buildRequest(args) {
  const { logit, label } = args;
  const logitDtype = logit && LOGIT_DTYPES.get(logit.constructor);
  if (!logitDtype) throw invalid('logit: must be a Float32Array or a Float64Array');
  if (!label || !ArrayBuffer.isView(label)) throw invalid('label: must be a typed array');
  const shape = args.shape !== undefined ? args.shape : [logit.length];
  // Unspecified label format: class-index for integer labels, dense otherwise.
  const labelFormat = enumValue(args.labelFormat, LABEL_FORMATS, 'labelFormat')
    || (CLASS_INDEX_LABEL_DTYPES.has(label.constructor) ? 'LABEL_FORMAT_CLASS_INDEX' : 'LABEL_FORMAT_DENSE');
  const classIndex = labelFormat === 'LABEL_FORMAT_CLASS_INDEX' || labelFormat === 2;
  const labelDtypes = classIndex ? CLASS_INDEX_LABEL_DTYPES : DENSE_LABEL_DTYPES;
  const labelDtype = labelDtypes.get(label.constructor);
  if (!labelDtype) {
    throw invalid(classIndex ? 'label: class-index labels must be an Int32Array or a BigInt64Array'
      : 'label: dense labels must be a Float32Array, a Float64Array or a Uint8Array');
  }
  const labelShape = args.labelShape !== undefined ? args.labelShape
    : (classIndex ? [checkShape(shape, 'shape')[0], 1] : shape);
  const reduction = enumValue(args.reduction, REDUCTIONS, 'reduction') || 'REDUCTION_SUM';

  const request = {
    requestId: args.requestId || '',
    logit: encodeTensor(logit, logitDtype, shape, 'logit'),
    label: encodeTensor(label, labelDtype, labelShape, 'label'),
    labelFormat,
    reduction,
    computeGrad: Boolean(args.computeGrad),
    backend: enumValue(args.backend, BACKENDS, 'backend') || 'BACKEND_AUTO',
  };
  // proto3 `optional`: set only when given, so that the server applies its defaults otherwise.
  for (const key of ['alpha', 'gamma', 'normalizer']) {
    if (args[key] !== undefined && args[key] !== null) {
      if (typeof args[key] !== 'number') throw invalid(`${key}: must be a number`);
      request[key] = args[key];
    }
  }
  if (args.gradOutput !== undefined && args.gradOutput !== null) {
    const g = args.gradOutput;
    const none = reduction === 'REDUCTION_NONE' || reduction === 1;
    if (typeof g === 'number') {
      const Ctor = floatTypeFor(logitDtype);
      request.gradOutput = encodeTensor(Ctor.of(g), logitDtype, [], 'gradOutput');
    } else {
      const gDtype = LOGIT_DTYPES.get(g.constructor);
      if (!gDtype) throw invalid('gradOutput: must be a number, a Float32Array or a Float64Array');
      const gShape = args.gradOutputShape !== undefined ? args.gradOutputShape : (none ? shape : []);
      request.gradOutput = encodeTensor(g, gDtype, gShape, 'gradOutput');
    }
  }
  return request;
}

function decodeResponse(response) {
  const loss = response.loss ? decodeTensor(response.loss, 'loss') : { array: null, shape: null };
  const grad = response.grad ? decodeTensor(response.grad, 'grad') : { array: null, shape: null };
  const s = response.stats || {};
  return {
    requestId: response.requestId,
    loss: loss.array,
    lossShape: loss.shape,
    grad: grad.array,
    gradShape: grad.shape,
    backend: response.backend,
    stats: {
      elements: Number(s.elements || 0),
      positives: s.positives || 0,
      lossSum: s.lossSum || 0,
      computeSeconds: s.computeSeconds || 0,
    },
  };
}

function serviceConfig(maxAttempts) {
  return JSON.stringify({ methodConfig: [{
    name: [{ service: SERVICE }],
    retryPolicy: { maxAttempts, initialBackoff: '0.1s', maxBackoff: '2s', backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE'] },
  }] });
}

/**
 * A client of one focalserve target ("host:port").
 * options: timeoutMs (deadline of every call, default 60000), maxMessageBytes (default 256 MiB, the server's
 * default), maxAttempts (UNAVAILABLE is retried with exponential backoff, default 5), credentials (default
 * insecure), channelOptions (extra grpc-js channel options).
 */
function createClient(target, options = {}) {
  const timeoutMs = options.timeoutMs !== undefined ? options.timeoutMs : DEFAULT_TIMEOUT_MS;
  const maxMessageBytes = options.maxMessageBytes || DEFAULT_MAX_MESSAGE_BYTES;
  const { Service } = contract();
  const stub = new Service(target, options.credentials || grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.service_config': serviceConfig(options.maxAttempts || 5),
    'grpc.per_rpc_retry_buffer_size': maxMessageBytes,
    ...(options.channelOptions || {}),
  });

  function unary(method, request, callTimeoutMs) {
    const ms = callTimeoutMs !== undefined ? callTimeoutMs : timeoutMs;
    const callOptions = ms ? { deadline: new Date(Date.now() + ms) } : {};
    return new Promise((resolve, reject) => {
      stub[method](request, callOptions, (err, response) => {
        if (err) reject(toFocalLossError(err, request.requestId || ''));
        else resolve(response);
      });
    });
  }

  return {
    /**
     * One batch. Resolves to {loss, lossShape, grad, gradShape, backend, stats, requestId}: loss and grad are
     * Float32Array/Float64Array in the logit's dtype (grad null unless computeGrad), the shapes arrays of numbers.
     */
    async compute(args, { timeoutMs: callTimeoutMs } = {}) {
      const request = buildRequest(args || {});
      return decodeResponse(await unary('Compute', request, callTimeoutMs));
    },
    /** GetServerInfo: {version, backends, defaultBackend, devices, logitDtypes, maxMessageBytes, maxElements}. */
    serverInfo({ timeoutMs: callTimeoutMs } = {}) {
      return unary('GetServerInfo', {}, callTimeoutMs);
    },
    close() {
      stub.close();
    },
    /** The underlying grpc-js stub, for ComputeStream and anything else this module does not wrap. */
    stub,
  };
}

module.exports = { createClient, FocalLossError, decodeTensor, encodeTensor, buildRequest, decodeViolations };
