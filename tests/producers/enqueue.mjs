#!/usr/bin/env node
// An agentworker producer in another language, written from docs/protocol.md alone: Node.js 20, no npm
// packages. It reads the routing table from Redis, routes the tenant (BLAKE2b-512 + jump consistent
// hash), builds the job id and JSON record, runs agentworker/lua/enqueue.lua (EVALSHA, SCRIPT LOAD on
// NOSCRIPT) and, with --wait, polls the job's result. Redis is spoken over a tiny RESP2 client on `net`:
// every argument goes as a length-prefixed bulk string, so the job JSON is sent byte for byte.
//
//   node tests/producers/enqueue.mjs --redis redis://127.0.0.1:6379/0 --tenant acme --task echo \
//        [--key k1] [--payload '{"message":"hi"}'] [--defer SECONDS] [--wait SECONDS] [--route-only]
//   node tests/producers/enqueue.mjs --check-vectors tests/data/routing_vectors.json
//
// Prints one JSON line ({"job_id", "code", "outcome", "detail", "pool", "shard", "queue"}), then with
// --wait the result record (arq:result:{id}) as a second line. Exit status: 0 enqueued or duplicate,
// 3 over max_pending, 4 over rate_limit, 5 the job failed, 6 no result within --wait, 2 bad usage or
// input, 1 Redis or protocol trouble.

import { createHash, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { fileURLToPath } from 'node:url';

// -- the protocol's constants (docs/protocol.md) ---------------------------------------------------------

const ROUTING_KEY = 'agentworker:routing';
const ROUTING_TABLE_MIN_VERSION = 2;  // versions only add keys: 2 added the tenants' limits
const TENANT_RE = /^[a-z0-9][a-z0-9_-]{0,62}$/;
const TASK_RE = /^[a-z_][a-z0-9_.]{0,63}$/;
const KEY_RE = /^[\x21-\x7e]{1,200}$/;
const MAX_PAYLOAD_BYTES = 1_048_576;
const UNCLAIMED_KEEP_MS = 86_400_000;  // a job record lives this long past its due time, as ARQ's do
const OUTCOMES = { 1: 'enqueued', 0: 'duplicate', '-1': 'over_max_pending', '-2': 'over_rate_limit' };
const EXIT = { enqueued: 0, duplicate: 0, over_max_pending: 3, over_rate_limit: 4 };

class UsageError extends Error {}

// -- routing -----------------------------------------------------------------------------------------------

const MASK64 = (1n << 64n) - 1n;

/** First 8 bytes of BLAKE2b-512 of the UTF-8 tenant id, big-endian unsigned. */
export function tenantHashKey(tenantId) {
  return createHash('blake2b512').update(tenantId, 'utf8').digest().readBigUInt64BE(0);
}

/** Lamping & Veach's jump consistent hash; the division is in doubles, as in the paper's C. */
export function jumpConsistentHash(key, buckets) {
  if (!(buckets >= 1)) throw new RangeError('buckets must be >= 1');
  let b = -1;
  let j = 0;
  key &= MASK64;
  while (j < buckets) {
    b = j;
    key = (key * 2862933555777941757n + 1n) & MASK64;
    j = Math.floor((b + 1) * (2147483648 / Number((key >> 33n) + 1n)));
  }
  return b;
}

function route(table, tenantId) {
  // Own properties only: "constructor" is a valid tenant id, and a JS object inherits one.
  const named = (map) => (Object.hasOwn(map, tenantId) ? map[tenantId] : undefined);
  const pool = named(table.tenants) ?? table.default_pool;
  const poolEntry = Object.hasOwn(table.pools, pool) ? table.pools[pool] : undefined;
  if (!poolEntry) throw new Error(`routing table names pool ${JSON.stringify(pool)} but does not define it`);
  const key = tenantHashKey(tenantId);
  const shard = jumpConsistentHash(key, poolEntry.shards);
  const limits = named(table.tenant_limits) ?? table.tenant_defaults;
  return {
    tenant_id: tenantId, pool, shard, queue: `agentworker:queue:${pool}:${shard}`,
    key: key.toString(), key_hex: key.toString(16).padStart(16, '0'),
    limits: { max_pending: limits.max_pending ?? null, rate_limit: limits.rate_limit ?? null },
  };
}

function checkVectors(path) {
  const vectors = JSON.parse(readFileSync(path, 'utf8'));
  const mismatches = [];
  let checked = 0;
  for (const c of vectors.jump_hash_reference) {
    checked += 1;
    const got = jumpConsistentHash(BigInt(c.key), c.buckets);
    if (got !== c.bucket) mismatches.push({ key: c.key, buckets: c.buckets, expected: c.bucket, got });
  }
  for (const v of vectors.vectors) {
    const key = tenantHashKey(v.tenant_id);
    checked += 1;
    if (key.toString() !== v.key) mismatches.push({ tenant_id: v.tenant_id, expected_key: v.key, got: key.toString() });
    for (const [shards, expected] of Object.entries(v.shards)) {
      checked += 1;
      const got = jumpConsistentHash(key, Number(shards));
      if (got !== expected) mismatches.push({ tenant_id: v.tenant_id, shards: Number(shards), expected, got });
    }
  }
  return { checked, mismatches };
}

// -- a minimal RESP2 client ------------------------------------------------------------------------------

class RedisError extends Error {}

function encodeCommand(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = Buffer.isBuffer(arg) ? arg : Buffer.from(String(arg), 'utf8');
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}

/** Parse one reply at `at`: [value, next offset], or undefined while it is incomplete. */
function parseReply(buf, at) {
  const end = buf.indexOf('\r\n', at);
  if (end < 0) return undefined;
  const type = buf[at];
  const line = buf.toString('utf8', at + 1, end);
  switch (type) {
    case 0x2b: return [line, end + 2];                        // + simple string
    case 0x2d: return [new RedisError(line), end + 2];        // - error
    case 0x3a: return [Number(line), end + 2];                // : integer
    case 0x24: {                                              // $ bulk string (a Buffer)
      const n = Number(line);
      if (n < 0) return [null, end + 2];
      if (buf.length < end + 2 + n + 2) return undefined;
      return [buf.subarray(end + 2, end + 2 + n), end + 2 + n + 2];
    }
    case 0x2a: {                                              // * array
      const n = Number(line);
      if (n < 0) return [null, end + 2];
      const items = [];
      let next = end + 2;
      for (let i = 0; i < n; i += 1) {
        const item = parseReply(buf, next);
        if (item === undefined) return undefined;
        items.push(item[0]);
        next = item[1];
      }
      return [items, next];
    }
    default: throw new RedisError(`unexpected RESP reply type ${JSON.stringify(String.fromCharCode(type))}`);
  }
}

class RedisConnection {
  static async open(url) {
    const parsed = new URL(url);
    if (parsed.protocol !== 'redis:') throw new UsageError(`--redis must be a redis:// URL (got ${url})`);
    const socket = net.createConnection({ host: parsed.hostname || '127.0.0.1', port: Number(parsed.port || 6379) });
    await new Promise((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const conn = new RedisConnection(socket);
    if (parsed.password) {
      const user = decodeURIComponent(parsed.username);
      const password = decodeURIComponent(parsed.password);
      await conn.call(...(user ? ['AUTH', user, password] : ['AUTH', password]));
    }
    const db = parsed.pathname.replace(/^\//, '');
    if (db && db !== '0') await conn.call('SELECT', db);
    return conn;
  }

  constructor(socket) {
    this.socket = socket;
    this.buffer = Buffer.alloc(0);
    this.waiting = [];
    socket.on('data', (chunk) => this.onData(chunk));
    socket.on('error', (err) => this.failAll(err));
    socket.on('close', () => this.failAll(new RedisError('connection to Redis closed')));
  }

  onData(chunk) {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, chunk]) : chunk;
    let at = 0;
    while (at < this.buffer.length && this.waiting.length) {
      let parsed;
      try {
        parsed = parseReply(this.buffer, at);
      } catch (err) {
        this.failAll(err);
        return;
      }
      if (parsed === undefined) break;
      const [value, next] = parsed;
      at = next;
      const { resolve, reject } = this.waiting.shift();
      if (value instanceof RedisError) reject(value); else resolve(value);
    }
    this.buffer = this.buffer.subarray(at);
  }

  failAll(err) {
    for (const { reject } of this.waiting.splice(0)) reject(err);
  }

  call(...args) {
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.socket.write(encodeCommand(args));
    });
  }

  close() {
    this.socket.end();
  }
}

// -- the producer ----------------------------------------------------------------------------------------

async function readRoutingTable(redis) {
  const raw = await redis.call('GET', ROUTING_KEY);
  if (raw === null) {
    throw new Error(`no routing table at ${ROUTING_KEY}: is an agentworker supervisor running on this Redis?`);
  }
  const table = JSON.parse(raw.toString('utf8'));
  if (!(table.version >= ROUTING_TABLE_MIN_VERSION)) {
    throw new Error(`routing table version ${table.version} has no tenant limits: this producer needs version `
                    + `${ROUTING_TABLE_MIN_VERSION} or later (upgrade the agentworker supervisor)`);
  }
  return table;
}

async function redisNowMs(redis) {
  const [seconds, micros] = await redis.call('TIME');
  return Number(seconds) * 1000 + Math.floor(Number(micros) / 1000);
}

/** Run the script by its SHA1; load it once when this Redis does not have it (NOSCRIPT). */
async function evalScript(redis, script, keys, args) {
  const sha = createHash('sha1').update(script).digest('hex');
  const command = ['EVALSHA', sha, keys.length, ...keys, ...args];
  try {
    return await redis.call(...command);
  } catch (err) {
    if (!(err instanceof RedisError) || !err.message.startsWith('NOSCRIPT')) throw err;
    const loaded = (await redis.call('SCRIPT', 'LOAD', script)).toString();
    if (loaded !== sha) throw new Error(`SCRIPT LOAD returned ${loaded}, expected ${sha}`);
    return redis.call(...command);
  }
}

function buildPayload(text, tenantId) {
  let payload;
  try {
    payload = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`--payload is not JSON: ${err.message}`);
  }
  if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
    throw new UsageError('--payload must be a JSON object');
  }
  if (payload.tenant_id === undefined) payload.tenant_id = tenantId;
  if (payload.tenant_id !== tenantId) {
    throw new UsageError(`payload tenant_id ${JSON.stringify(payload.tenant_id)} does not match tenant ${tenantId}`);
  }
  if (Buffer.byteLength(JSON.stringify(payload), 'utf8') > MAX_PAYLOAD_BYTES) {
    throw new UsageError(`payload is over the ${MAX_PAYLOAD_BYTES}-byte limit`);
  }
  return payload;
}

async function enqueue(redis, table, opts) {
  const r = route(table, opts.tenant);
  const jobId = `${opts.tenant}:${opts.task}:${opts.key}`;
  const now = await redisNowMs(redis);  // due times are compared with Redis' clock: take ours from it
  const deferMs = Math.round(opts.defer * 1000);
  const due = now + deferMs;
  const record = JSON.stringify({ t: null, f: opts.task, a: [], k: opts.payload, et: now });
  const q = `${r.pool}:${r.shard}`;
  const keys = [
    `arq:job:${jobId}`, `arq:result:${jobId}`, `agentworker:tq:${q}:${opts.tenant}`,
    `agentworker:pending:${opts.tenant}`, `agentworker:rate:${opts.tenant}`, `agentworker:ready:${q}`,
    `agentworker:waiting:${q}`, `agentworker:capped:${q}`, `agentworker:vclock:${q}`,
  ];
  const rate = r.limits.rate_limit;
  const args = [
    jobId, Buffer.from(record, 'utf8'), due, deferMs + UNCLAIMED_KEEP_MS,
    r.limits.max_pending ?? -1, rate ? rate.count : 0, rate ? rate.period_ms : 0,
    `agentworker:wakeup:${r.pool}`, opts.tenant, r.queue,
  ];
  const script = readFileSync(opts.script);
  const [code, detail] = await evalScript(redis, script, keys, args);
  const outcome = OUTCOMES[code];
  if (outcome === undefined) throw new Error(`enqueue script returned unknown code ${code}`);
  const detailText = Buffer.isBuffer(detail) ? detail.toString() : String(detail ?? '');
  return { job_id: jobId, code, outcome, detail: detailText === '' ? null : Number(detailText),
           pool: r.pool, shard: r.shard, queue: r.queue };
}

async function waitForResult(redis, jobId, seconds) {
  const deadline = Date.now() + seconds * 1000;
  let delay = 5;
  for (;;) {
    const raw = await redis.call('GET', `arq:result:${jobId}`);
    if (raw !== null) return JSON.parse(raw.toString('utf8'));
    if (Date.now() >= deadline) return null;
    await new Promise((resolve) => setTimeout(resolve, Math.min(delay, Math.max(0, deadline - Date.now()))));
    delay = Math.min(delay * 2, 250);
  }
}

function parseArgs(argv) {
  const opts = { payload: '{}', defer: 0, wait: null, routeOnly: false,
                 script: fileURLToPath(new URL('../../agentworker/lua/enqueue.lua', import.meta.url)) };
  const valued = { '--redis': 'redis', '--tenant': 'tenant', '--task': 'task', '--key': 'key',
                   '--payload': 'payload', '--defer': 'defer', '--wait': 'wait', '--script': 'script',
                   '--check-vectors': 'checkVectors' };
  for (let i = 0; i < argv.length; i += 1) {
    const flag = argv[i];
    if (flag === '--route-only') { opts.routeOnly = true; continue; }
    const name = valued[flag];
    if (name === undefined || i + 1 >= argv.length) throw new UsageError(`unknown option or missing value: ${flag}`);
    opts[name] = argv[++i];
  }
  if (opts.checkVectors) return opts;
  for (const required of ['redis', 'tenant']) {
    if (!opts[required]) throw new UsageError(`--${required} is required`);
  }
  if (!TENANT_RE.test(opts.tenant)) throw new UsageError(`invalid tenant id ${JSON.stringify(opts.tenant)}`);
  if (opts.routeOnly) return opts;
  if (!opts.task || !TASK_RE.test(opts.task)) throw new UsageError(`invalid or missing --task ${JSON.stringify(opts.task)}`);
  opts.key ??= randomUUID().replaceAll('-', '');
  if (!KEY_RE.test(opts.key)) throw new UsageError(`invalid idempotency key ${JSON.stringify(opts.key)}`);
  opts.defer = Number(opts.defer);
  if (!(opts.defer >= 0)) throw new UsageError('--defer must be a number of seconds >= 0');
  if (opts.wait !== null) {
    opts.wait = Number(opts.wait);
    if (!(opts.wait >= 0)) throw new UsageError('--wait must be a number of seconds >= 0');
  }
  opts.payload = buildPayload(opts.payload, opts.tenant);
  return opts;
}

async function main(argv) {
  const opts = parseArgs(argv);
  if (opts.checkVectors) {
    const report = checkVectors(opts.checkVectors);
    console.log(JSON.stringify(report));
    return report.mismatches.length ? 1 : 0;
  }
  const redis = await RedisConnection.open(opts.redis);
  try {
    const table = await readRoutingTable(redis);
    if (opts.routeOnly) {
      console.log(JSON.stringify(route(table, opts.tenant)));
      return 0;
    }
    const enqueued = await enqueue(redis, table, opts);
    console.log(JSON.stringify(enqueued));
    if (opts.wait === null || enqueued.code < 0) return EXIT[enqueued.outcome];
    const result = await waitForResult(redis, enqueued.job_id, opts.wait);
    if (result === null) {
      console.error(`no result for ${enqueued.job_id} after ${opts.wait}s`);
      return 6;
    }
    console.log(JSON.stringify(result));
    return result.s ? 0 : 5;
  } finally {
    redis.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => {
    console.error(`enqueue.mjs: ${err.message}`);
    process.exitCode = err instanceof UsageError ? 2 : 1;
  },
);
