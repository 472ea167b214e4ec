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
//
// Requests are written by hand (encodeRequest): the small header fields, then the arrays' bytes copied once
// into the message, sent with an identity serializer. protobufjs would build the same bytes through a message
// object and its writer; this skips both. Responses are decoded by protobufjs, whose `bytes` fields are views
// of the received buffer; a tensor is then viewed in place where its offset is aligned, copied where not.

const fs = require('fs');
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
const DEFAULT_FLOW_CONTROL_WINDOW_BYTES = 64 * 1024 * 1024;
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

const COMPUTE_PATH = `/${SERVICE}/Compute`;

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
  root.resolvePath = (origin, target) => {
    if (path.isAbsolute(target)) return target;
    const own = path.join(PROTO_DIR, target);
    return fs.existsSync(own) ? own : path.join(VENDORED_PROTO_DIR, target);
  };
  root.loadSync(PROTO_FILE, { keepCase: false });
  // google.rpc.BadRequest and ErrorInfo as google/rpc/error_details.proto defines them (names and numbers).
  protobuf.parse(`syntax = "proto3"; package google.rpc;
    message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
    message BadRequest {
      message FieldViolation { string field = 1; string description = 2; string reason = 3;
                               LocalizedMessage localized_message = 4; }
      repeated FieldViolation field_violations = 1; }
    message LocalizedMessage { string locale = 1; string message = 2; }`, root, { keepCase: false });
  root.resolveAll();
  const enumValues = (name) => root.lookupEnum(`focalloss.v1.${name}`).values;
  cached = {
    Service: loaded.focalloss.v1.FocalLossService,
    Status: root.lookupType('google.rpc.Status'),
    BadRequest: root.lookupType('google.rpc.BadRequest'),
    ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
    ComputeRequest: root.lookupType('focalloss.v1.ComputeRequest'),
    ComputeResponse: root.lookupType('focalloss.v1.ComputeResponse'),
    enums: {
      DType: enumValues('DType'), LabelFormat: enumValues('LabelFormat'), Reduction: enumValues('Reduction'),
      Backend: enumValues('Backend'),
    },
    dtypeNames: root.lookupEnum('focalloss.v1.DType').valuesById,
  };
  return cached;
}

/**
 * A refused or failed call: `code` (grpc status number), `codeName`, `details` (the status message),
 * `violations` [{field, description, reason}] (google.rpc.BadRequest), and the machine-readable cause where the
 * server gave one (google.rpc.ErrorInfo): `reason` (e.g. 'OVERLOADED', 'TOKEN_MISSING'), `domain`,
 * `errorMetadata` ({key: value}); `errorInfo` is all three, or null. Branch on `code` and `reason`, never on
 * the text of `details`.
 */
class FocalLossError extends Error {
  constructor(code, details, { violations = [], errorInfo = null, metadata = null, requestId = '' } = {}) {
    const codeName = STATUS_NAMES[code] || String(code);
    super(`${codeName}: ${details}`);
    this.name = 'FocalLossError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.violations = violations;
    this.errorInfo = errorInfo;
    this.reason = errorInfo ? errorInfo.reason : '';
    this.domain = errorInfo ? errorInfo.domain : '';
    this.errorMetadata = errorInfo ? errorInfo.metadata : {};
    this.metadata = metadata;
    this.requestId = requestId;
  }
}

/**
 * The google.rpc.Status details of a `grpc-status-details-bin` trailer: {violations, errorInfo}, where
 * violations are the google.rpc.BadRequest field violations ([] when none) and errorInfo the first
 * google.rpc.ErrorInfo as {reason, domain, metadata} (null when none). A malformed trailer gives neither: the
 * status code and message remain, and they are what matter.
 */
function decodeStatusDetails(metadata) {
  const values = metadata && typeof metadata.get === 'function' ? metadata.get('grpc-status-details-bin') : [];
  const result = { violations: [], errorInfo: null };
  if (!values || values.length === 0) return result;
  const { Status, BadRequest, ErrorInfo } = contract();
  try {
    const status = Status.decode(Buffer.isBuffer(values[0]) ? values[0] : Buffer.from(values[0], 'base64'));
    for (const any of status.details || []) {
      // protobufjs's bundled google/protobuf/any.proto keeps the proto field name type_url
      const typeUrl = String(any.typeUrl || any.type_url || '');
      if (typeUrl.endsWith('/google.rpc.BadRequest')) {
        for (const v of BadRequest.decode(any.value).fieldViolations) {
          result.violations.push({ field: v.field, description: v.description, reason: v.reason });
        }
      } else if (typeUrl.endsWith('/google.rpc.ErrorInfo') && !result.errorInfo) {
        const info = ErrorInfo.decode(any.value);
        result.errorInfo = { reason: info.reason, domain: info.domain, metadata: { ...info.metadata } };
      }
    }
  } catch (_) {
    return { violations: [], errorInfo: null };
  }
  return result;
}

/** The google.rpc.BadRequest field violations in a `grpc-status-details-bin` trailer ([] when none). */
function decodeViolations(metadata) {
  return decodeStatusDetails(metadata).violations;
}

function toFocalLossError(err, requestId) {
  if (err instanceof FocalLossError) return err;
  if (err && typeof err.code === 'number') {
    const { violations, errorInfo } = decodeStatusDetails(err.metadata);
    return new FocalLossError(err.code, err.details !== undefined ? err.details : err.message, {
      violations, errorInfo, metadata: err.metadata || null, requestId });
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
  const dtype = typeof tensor.dtype === 'number' ? contract().dtypeNames[tensor.dtype] : tensor.dtype;
  const info = DTYPES[dtype];
  if (!info) throw new FocalLossError(grpc.status.INTERNAL, `${field}: unsupported dtype ${tensor.dtype}`);
  const shape = (tensor.shape || []).map(toNumber);
  const n = numel(shape);
  const data = tensor.data || Buffer.alloc(0);
  if (data.length !== n * info.size) {
    throw new FocalLossError(grpc.status.INTERNAL,
      `${field}: ${data.length} bytes for shape ${JSON.stringify(shape)} of ${dtype}`);
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

const FLOAT32_ONE_BITS = 0x3f800000;
const FLOAT64_ONE_HIGH_BITS = 0x3ff00000;

/**
 * Dense float labels that are all exactly 0 or 1 as a Uint8Array (1 byte a label on the wire instead of 4 or 8),
 * or null at the first other value (soft labels, -100, -0, NaN). The server reads UINT8 0/1 as the same label
 * values, so nothing it computes changes. One pass over the labels' bits, stopping early where it can.
 */
function hardLabels(label) {
  const n = label.length;
  const out = new Uint8Array(n);
  if (label instanceof Float32Array) {
    const bits = new Uint32Array(label.buffer, label.byteOffset, n);
    for (let i = 0; i < n; i++) {
      const b = bits[i];
      if (b === FLOAT32_ONE_BITS) out[i] = 1;
      else if (b !== 0) return null;
    }
    return out;
  }
  if (label instanceof Float64Array) {
    const words = new Uint32Array(label.buffer, label.byteOffset, 2 * n);
    const [lo, hi] = LITTLE_ENDIAN ? [0, 1] : [1, 0];
    for (let i = 0; i < n; i++) {
      const high = words[2 * i + hi];
      if (words[2 * i + lo] !== 0) return null;
      if (high === FLOAT64_ONE_HIGH_BITS) out[i] = 1;
      else if (high !== 0) return null;
    }
    return out;
  }
  return null;
}

/** Class-index labels of a BigInt64Array as an Int32Array where every one fits (4 bytes a label, not 8), or null. */
function int32Labels(label) {
  const out = new Int32Array(label.length);
  for (let i = 0; i < label.length; i++) {
    const v = label[i];
    if (v < -2147483648n || v > 2147483647n) return null;
    out[i] = Number(v);
  }
  return out;
}

/**
 * The ComputeRequest message for compute()'s arguments (throws FocalLossError INVALID_ARGUMENT on misuse).
 * Dense float labels that are all 0 or 1 travel as UINT8, BigInt64Array class-index labels as INT32 where they
 * fit, unless `narrowLabels: false`.
 */
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
  let labelDtype = labelDtypes.get(label.constructor);
  if (!labelDtype) {
    throw invalid(classIndex ? 'label: class-index labels must be an Int32Array or a BigInt64Array'
      : 'label: dense labels must be a Float32Array, a Float64Array or a Uint8Array');
  }
  let labelArray = label;
  if (args.narrowLabels !== false && (labelDtype === 'DTYPE_FLOAT32' || labelDtype === 'DTYPE_FLOAT64'
    || labelDtype === 'DTYPE_INT64')) {
    const narrow = classIndex ? int32Labels(label) : hardLabels(label);
    if (narrow) {
      labelArray = narrow;
      labelDtype = classIndex ? 'DTYPE_INT32' : 'DTYPE_UINT8';
    }
  }
  const labelShape = args.labelShape !== undefined ? args.labelShape
    : (classIndex ? [checkShape(shape, 'shape')[0], 1] : shape);
  const reduction = enumValue(args.reduction, REDUCTIONS, 'reduction') || 'REDUCTION_SUM';

  const request = {
    requestId: args.requestId || '',
    logit: encodeTensor(logit, logitDtype, shape, 'logit'),
    label: encodeTensor(labelArray, labelDtype, labelShape, 'label'),
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

/** An int64 as protobufjs decodes it (a number, or a Long where long.js is installed) as a number. */
function toNumber(value) {
  if (typeof value === 'number') return value;
  if (value && typeof value.toNumber === 'function') return value.toNumber();
  return Number(value);
}

// ---- the request, written by hand: field numbers and wire types of focal_loss.proto's ComputeRequest/Tensor ----

const WIRE_VARINT = 0;
const WIRE_FIXED64 = 1;
const WIRE_LEN = 2;

function varintSize(value) {
  let n = 1;
  while (value >= 128) { value = Math.floor(value / 128); n++; }
  return n;
}

function putVarint(buf, pos, value) {
  while (value >= 128) {
    buf[pos++] = (value % 128) | 128;
    value = Math.floor(value / 128);
  }
  buf[pos++] = value;
  return pos;
}

function enumNumber(value, table, field) {
  if (typeof value === 'number') return value;
  const number = table[value];
  if (number === undefined) throw invalid(`${field}: unknown value ${JSON.stringify(value)}`);
  return number;
}

/** A Tensor message's layout: its header's size and the byte view of its data (not copied). */
function tensorPlan(tensor, field) {
  const dtype = enumNumber(tensor.dtype, contract().enums.DType, `${field}.dtype`);
  const shape = tensor.shape.map(toNumber);
  const data = tensor.data instanceof Uint8Array ? tensor.data
    : new Uint8Array(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength);
  let shapeBytes = 0;
  for (const d of shape) shapeBytes += varintSize(d);
  let size = 0;
  if (dtype !== 0) size += 1 + varintSize(dtype);
  if (shape.length) size += 1 + varintSize(shapeBytes) + shapeBytes;
  if (data.length) size += 1 + varintSize(data.length) + data.length;
  return { dtype, shape, shapeBytes, data, size };
}

function putTensor(buf, pos, fieldNumber, plan) {
  pos = putVarint(buf, pos, (fieldNumber << 3) | WIRE_LEN);
  pos = putVarint(buf, pos, plan.size);
  if (plan.dtype !== 0) {
    buf[pos++] = (1 << 3) | WIRE_VARINT;
    pos = putVarint(buf, pos, plan.dtype);
  }
  if (plan.shape.length) {
    buf[pos++] = (2 << 3) | WIRE_LEN; // packed repeated int64
    pos = putVarint(buf, pos, plan.shapeBytes);
    for (const d of plan.shape) pos = putVarint(buf, pos, d);
  }
  if (plan.data.length) {
    buf[pos++] = (3 << 3) | WIRE_LEN;
    pos = putVarint(buf, pos, plan.data.length);
    buf.set(plan.data, pos); // the one copy of the array
    pos += plan.data.length;
  }
  return pos;
}

/**
 * The serialized ComputeRequest of buildRequest()'s object, as protobufjs would write it (fields in number
 * order, proto3 defaults left out, `optional` doubles written when set): one Buffer, into which each array's
 * bytes are copied once. Shapes are non-negative (buildRequest checks them), so every varint is unsigned.
 */
function encodeRequest(request) {
  const { enums } = contract();
  const id = request.requestId ? Buffer.from(request.requestId, 'utf8') : null;
  const tensors = [[2, request.logit, 'logit'], [3, request.label, 'label'], [10, request.gradOutput, 'gradOutput']]
    .filter(([, t]) => t).map(([n, t, name]) => [n, tensorPlan(t, name)]);
  const varints = [
    [4, enumNumber(request.labelFormat || 0, enums.LabelFormat, 'labelFormat')],
    [8, enumNumber(request.reduction || 0, enums.Reduction, 'reduction')],
    [9, request.computeGrad ? 1 : 0],
    [11, enumNumber(request.backend || 0, enums.Backend, 'backend')],
  ].filter(([, v]) => v !== 0);
  const doubles = [[5, request.alpha], [6, request.gamma], [7, request.normalizer]]
    .filter(([, v]) => v !== undefined && v !== null);

  let size = id ? 1 + varintSize(id.length) + id.length : 0;
  for (const [, plan] of tensors) size += 1 + varintSize(plan.size) + plan.size;
  for (const [, v] of varints) size += 1 + varintSize(v);
  size += 9 * doubles.length;

  const buf = Buffer.allocUnsafe(size);
  let pos = 0;
  // every field in number order: 1 request_id, 2 logit, 3 label, 4, 5-7 doubles, 8, 9, 10 grad_output, 11
  const fields = [];
  if (id) fields.push([1, () => { buf[pos++] = (1 << 3) | WIRE_LEN; pos = putVarint(buf, pos, id.length);
    id.copy(buf, pos); pos += id.length; }]);
  for (const [n, plan] of tensors) fields.push([n, () => { pos = putTensor(buf, pos, n, plan); }]);
  for (const [n, v] of varints) fields.push([n, () => { buf[pos++] = (n << 3) | WIRE_VARINT; pos = putVarint(buf, pos, v); }]);
  for (const [n, v] of doubles) fields.push([n, () => { buf[pos++] = (n << 3) | WIRE_FIXED64; buf.writeDoubleLE(v, pos);
    pos += 8; }]);
  fields.sort((a, b) => a[0] - b[0]);
  for (const [, write] of fields) write();
  if (pos !== size) throw new Error(`encodeRequest: wrote ${pos} of ${size} bytes`);
  return buf;
}

function decodeResponse(response) {
  const loss = response.loss ? decodeTensor(response.loss, 'loss') : { array: null, shape: null };
  const grad = response.grad ? decodeTensor(response.grad, 'grad') : { array: null, shape: null };
  const s = response.stats || {};
  return {
    requestId: response.requestId || '',
    loss: loss.array,
    lossShape: loss.shape,
    grad: grad.array,
    gradShape: grad.shape,
    backend: response.backend,
    stats: {
      elements: toNumber(s.elements || 0),
      positives: s.positives || 0,
      lossSum: s.lossSum || 0,
      computeSeconds: s.computeSeconds || 0,
    },
  };
}

function serviceConfig(maxAttempts) {
  // maxAttempts 1 means no retries: gRPC refuses a retry policy of fewer than 2 attempts (the whole channel)
  const retryPolicy = maxAttempts >= 2 ? {
    retryPolicy: { maxAttempts, initialBackoff: '0.1s', maxBackoff: '2s', backoffMultiplier: 2,
      // CANCELLED too, as the Python client: a server shutting down cancels calls it received but had not
      // started (grpc/grpc#41785). Every call is a pure function, so a retry is always safe; gRPC never retries
      // once response headers came, nor a call this client cancelled.
      retryableStatusCodes: ['UNAVAILABLE', 'CANCELLED'] } } : {};
  return JSON.stringify({ methodConfig: [{ name: [{ service: SERVICE }], ...retryPolicy }] });
}

function bearer(token) {
  if (token === undefined || token === null || token === '') return null;
  if (typeof token !== 'string' || /[\r\n]/.test(token)) throw invalid('token: must be a string on one line');
  return `Bearer ${token}`;
}

/**
 * A client of one focalserve target ("host:port").
 * options: timeoutMs (deadline of every call, default 60000), maxMessageBytes (default 256 MiB, the server's
 * default), maxAttempts (UNAVAILABLE and CANCELLED by the server are retried with exponential backoff,
 * default 5), token (sent as `authorization: Bearer <token>` with every call), credentials (default insecure;
 * grpc.credentials.createSsl(...) for TLS), retryBufferBytes (what all calls in flight may hold for retries
 * together, default 4 × maxMessageBytes), flowControlWindowBytes (HTTP/2 receive window, default 64 MiB),
 * channelOptions (extra grpc-js channel options).
 *
 * Node's HTTP/2 window is 64 KiB unless raised: a large response then arrives 64 KiB per round trip of
 * WINDOW_UPDATE (4M elements with a gradient: 30-36 M el/s at 64 KiB, 49-51 at 64 MiB, benchmarks/node_client.js).
 *
 * gRPC keeps each request until its call commits so that it can resend it; a request that does not fit the
 * per-call or the channel-wide retry buffer is sent once, without retries. The buffers hold the requests
 * themselves (no copies), so their sizes are limits, not allocations: per call the message limit, so that
 * every request this client can send is retried; channel-wide room for four of the largest at once.
 */
function createClient(target, options = {}) {
  const timeoutMs = options.timeoutMs !== undefined ? options.timeoutMs : DEFAULT_TIMEOUT_MS;
  const maxMessageBytes = options.maxMessageBytes || DEFAULT_MAX_MESSAGE_BYTES;
  const retryBufferBytes = options.retryBufferBytes || 4 * maxMessageBytes;
  const flowControlWindowBytes = options.flowControlWindowBytes || DEFAULT_FLOW_CONTROL_WINDOW_BYTES;
  const authorization = bearer(options.token);
  const { Service, ComputeResponse } = contract();
  const stub = new Service(target, options.credentials || grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.service_config': serviceConfig(options.maxAttempts || 5),
    'grpc.per_rpc_retry_buffer_size': maxMessageBytes,
    'grpc.retry_buffer_size': Math.max(retryBufferBytes, maxMessageBytes),
    'grpc-node.flow_control_window': flowControlWindowBytes,
    ...(options.channelOptions || {}),
  });

  function callOptionsFor(callTimeoutMs) {
    const ms = callTimeoutMs !== undefined ? callTimeoutMs : timeoutMs;
    return ms ? { deadline: new Date(Date.now() + ms) } : {};
  }

  function metadata() {
    const m = new grpc.Metadata();
    if (authorization) m.set('authorization', authorization);
    return m;
  }

  function unary(method, request, callTimeoutMs) {
    return new Promise((resolve, reject) => {
      stub[method](request, metadata(), callOptionsFor(callTimeoutMs), (err, response) => {
        if (err) reject(toFocalLossError(err, request.requestId || ''));
        else resolve(response);
      });
    });
  }

  /** Compute with the request already serialized: identity serializer, protobufjs decoding the reply. */
  function computeBytes(bytes, requestId, callTimeoutMs) {
    return new Promise((resolve, reject) => {
      stub.makeUnaryRequest(COMPUTE_PATH, (b) => b, (b) => ComputeResponse.decode(b), bytes, metadata(),
        callOptionsFor(callTimeoutMs), (err, response) => {
          if (err) reject(toFocalLossError(err, requestId));
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
      return decodeResponse(await computeBytes(encodeRequest(request), request.requestId, callTimeoutMs));
    },
    /** GetServerInfo: {version, backends, defaultBackend, devices, logitDtypes, maxMessageBytes, maxElements}. */
    serverInfo({ timeoutMs: callTimeoutMs } = {}) {
      return unary('GetServerInfo', {}, callTimeoutMs);
    },
    close() {
      stub.close();
    },
    /** The underlying grpc-js stub, for ComputeStream and anything else this module does not wrap (pass
     * `metadata` with the token where the server wants one). */
    stub,
  };
}

module.exports = { createClient, contract, FocalLossError, decodeTensor, encodeTensor, buildRequest, encodeRequest,
  decodeStatusDetails, decodeViolations, serviceConfig };
