"""The Redis side of a job's life after enqueue: claim, lease renewal, finish, release, dead letters.

Each step is one Lua script, so it is atomic and costs one round trip. The record formats are ARQ's
(``arq:job:<id>``, ``arq:result:<id>``, ``arq:retry:<id>``, ``arq:in-progress:<id>``; the job stays in
its queue's sorted set while it runs), so the client's ``JobHandle`` and stock ARQ tooling read them as
before. What differs from ARQ is how long a claim lives and who may end it:

* **A lease, not a timeout.** The in-progress key holds its *holder* (``{hostname}:{pid}`` of the worker
  process) and lives ``AGENTWORKER_JOB_LEASE_TTL`` seconds (default 10), renewed every third of that by
  the holder for all its jobs in one script (:data:`RENEW_LUA`). ``job_timeout`` is the job's deadline,
  enforced by the envelope; the lease only says "someone is alive and running it".
* **Each holder's jobs are listed** in ``agentworker:held:{holder}``. When the supervisor reaps a dead
  worker it runs :data:`RELEASE_HOLDER_LUA`: the dead holder's leases are dropped at once (tenant
  concurrency leases too) and the pool is woken, so the jobs run again within milliseconds. When a whole
  host is gone nobody releases them, and the leases lapse within one TTL.
* **A crash is not a try.** ``agentworker:attempt:{id}`` records the holder of the attempt in progress.
  A claim that finds a previous attempt never finished knows its worker died: it counts a *crash*
  (``crashes``) and gives back the try the dead attempt had taken. Past the pool's
  ``max_crash_retries`` the claim answers ``poisoned`` and the worker fails the job as ``JobPoisoned``.
* **Only the holder ends a run.** Finishing checks the lease is still ours: a worker whose lease lapsed
  (a blocked loop, a partition) and whose job another worker took over writes nothing — the new
  holder's outcome wins — and renewal tells it which jobs it lost so it can cancel them.
* **Dead letters.** A queue entry that cannot be run (a record missing or of the wrong Redis type, found
  by the claim; a non-UTF-8 id or an undecodable record, found by the worker) is moved once, atomically,
  from the queue to the pool's hash ``agentworker:dead:{pool}`` with its reason (:data:`DEAD_LETTER_LUA`).

Scripts get their key *prefixes* as arguments where they must build names from job ids (the release),
so every name still comes from :mod:`agentworker.keys` and :mod:`agentworker.jobs`.
"""

from __future__ import annotations

import json
import os
import socket
import time

from redis.asyncio import Redis

from agentworker import jobs, keys

#: how long a job's attempt record is kept after its last claim (it is deleted when the job finishes)
ATTEMPT_TTL_MS = 7 * 86_400_000
#: ARQ's expiry of the retry counter (arq.worker: 88,400 s)
RETRY_TTL_S = 88_400

#: reasons a queue entry is dead-lettered (the label values of agentworker_dead_letters_total)
DEAD_LETTER_REASONS = ("non_utf8_id", "missing_record", "wrong_type", "bad_record", "bad_field")


def holder_id(pid: int | None = None) -> str:
    """The lease holder name of a worker process: the supervisor computes the same for its children."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


# KEYS: in-progress, queue, job, retry, attempt, held, dead letters, [pending, tenant leases]
# ARGV: job id, now (ms, the caller's clock: due times are the producer's), lease ttl ms, holder,
#       max crash retries, tenant cap (0 = none), tenant lease ttl ms, tenant lease member, attempt ttl ms,
#       retry counter ttl s
# Returns nil (running elsewhere, gone, or not due), 'cap' (tenant at max_concurrency: left queued),
# {'dead', reason, score} (moved to the dead letters), or {verdict, score, record, try, crashes, crashed}
# with verdict 'run' or 'poisoned' (crashed: 1 if this claim found the last attempt's worker dead).
CLAIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind = redis.call('TYPE', KEYS[3])['ok']
if kind ~= 'string' then
  local reason = 'wrong_type'
  local detail = 'the job record ' .. KEYS[3] .. ' is a Redis ' .. kind .. ', not a string'
  if kind == 'none' then
    reason = 'missing_record'
    detail = 'the job record ' .. KEYS[3] .. ' does not exist (expired or deleted)'
  end
  redis.call('ZREM', KEYS[2], ARGV[1])
  if KEYS[8] then redis.call('ZREM', KEYS[8], ARGV[1]) end
  redis.call('HSET', KEYS[7], ARGV[1], cjson.encode({reason = reason, detail = detail, queue = KEYS[2],
                                                     score = tonumber(score), ts = now}))
  return {'dead', reason, score}
end
local limit = tonumber(ARGV[6])
if limit > 0 and KEYS[9] then
  local ttl = tonumber(ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
  if redis.call('ZCARD', KEYS[9]) >= limit then return 'cap' end
  redis.call('ZADD', KEYS[9], now + ttl, ARGV[8])
  redis.call('PEXPIRE', KEYS[9], ttl * 2)
end
local lease = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[4], 'PX', lease)
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('PEXPIRE', KEYS[6], lease * 3)
if KEYS[8] then redis.call('ZREM', KEYS[8], ARGV[1]) end
local tries = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
local crashes = tonumber(redis.call('HGET', KEYS[5], 'crashes') or '0') or 0
local crashed = 0
if redis.call('HEXISTS', KEYS[5], 'holder') == 1 then
  crashed = 1
  -- the last attempt never finished: its worker died. That is a crash, and its try is given back.
  crashes = redis.call('HINCRBY', KEYS[5], 'crashes', 1)
  if tries > 0 then tries = tries - 1 end
end
redis.call('HSET', KEYS[5], 'holder', ARGV[4], 'since', now)
redis.call('PEXPIRE', KEYS[5], ARGV[9])
local record = redis.call('GET', KEYS[3])
if crashes > tonumber(ARGV[5]) then
  return {'poisoned', score, record, math.max(tries, 1), crashes, crashed}
end
tries = tries + 1
redis.call('SET', KEYS[4], tries, 'EX', ARGV[10])
return {'run', score, record, tries, crashes, crashed}
"""

# KEYS: in-progress, result, retry, job, abort set, queue, attempt, held, [tenant leases]
# ARGV: job id, holder, mode ('done' | 'retry' | 'requeue'), result ('' = none), result ttl ms ('' = keep
#       forever), score increment for 'retry' ('' = run again at its old score), tenant lease member
# 'done' ends the job (ARQ's finished job: result written, job, retry and in-progress keys gone, out of
# the queue); 'retry' leaves it queued for another try, re-scored; 'requeue' leaves it queued to run
# again at once without spending a try (cancelled by a drain). Returns 0 if the lease is another
# holder's (nothing is written but our own bookkeeping), else 1.
FINISH_LUA = """
redis.call('SREM', KEYS[8], ARGV[1])
if KEYS[9] then redis.call('ZREM', KEYS[9], ARGV[7]) end
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[2] then return 0 end
local mode = ARGV[3]
if mode == 'done' then
  if ARGV[4] ~= '' then
    if ARGV[5] == '' then redis.call('SET', KEYS[2], ARGV[4])
    else redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5]) end
  end
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[7])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
  return 1
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[7], 'holder')
if mode == 'retry' then
  if ARGV[6] ~= '' then redis.call('ZINCRBY', KEYS[6], ARGV[6], ARGV[1]) end
else
  local tries = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
  if tries > 0 then redis.call('SET', KEYS[3], tries - 1, 'KEEPTTL') end
end
return 1
"""

# KEYS: held, then per job its in-progress key and its job key, then the tenant lease keys
# ARGV: holder, job lease ttl ms, number of jobs, tenant lease ttl ms, the job ids, the tenant lease members
# Renews what is still ours; re-takes a lease that lapsed while nobody took the job over (its record is
# still there); returns the ids of jobs another holder has taken, or that are gone.
RENEW_LUA = """
local holder, ttl, n, tenant_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lost = {}
for i = 1, n do
  local lease, record = KEYS[2 * i], KEYS[2 * i + 1]
  local owner = redis.call('GET', lease)
  if owner == holder then
    redis.call('PEXPIRE', lease, ttl)
  elseif not owner and redis.call('EXISTS', record) == 1 then
    redis.call('SET', lease, holder, 'PX', ttl)
  else
    table.insert(lost, ARGV[4 + i])
  end
end
if n > 0 then redis.call('PEXPIRE', KEYS[1], ttl * 3) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for j = 2 * n + 2, #KEYS do
  redis.call('ZADD', KEYS[j], 'XX', now + tenant_ttl, ARGV[4 + n + (j - 2 * n - 1)])
  redis.call('PEXPIRE', KEYS[j], tenant_ttl * 2)
end
return lost
"""

# KEYS: held. ARGV: holder, in-progress key prefix, tenant lease key prefix, wake-up channel.
# Drops a dead holder's job leases (only those still its own) and its tenant leases, forgets its held set,
# and wakes the pool so the jobs run again now. Returns how many job leases were released.
RELEASE_HOLDER_LUA = """
local released = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local lease = ARGV[2] .. id
  if redis.call('GET', lease) == ARGV[1] then
    redis.call('DEL', lease)
    released = released + 1
  end
  local tenant = string.match(id, '^([^:]+):')
  if tenant then redis.call('ZREM', ARGV[3] .. tenant, id .. '@' .. ARGV[1]) end
end
redis.call('DEL', KEYS[1])
if released > 0 then redis.call('PUBLISH', ARGV[4], '*') end
return released
"""

# KEYS: queue, dead letters, in-progress, attempt, held, [pending, tenant leases]
# ARGV: raw job id, dead-letter record (JSON), holder, tenant lease member
# Moves the entry from its queue to the dead letters once (returns 0 if it is no longer queued), and
# drops the claim that found it unreadable.
DEAD_LETTER_LUA = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
redis.call('DEL', KEYS[4])
redis.call('SREM', KEYS[5], ARGV[1])
if KEYS[6] then redis.call('ZREM', KEYS[6], ARGV[1]) end
if KEYS[7] then redis.call('ZREM', KEYS[7], ARGV[4]) end
return 1
"""


def dead_letter_record(*, reason: str, detail: str, queue: str, score: float) -> bytes:
    """The JSON kept for one dead letter (the claim script writes the same fields)."""
    return json.dumps({"reason": reason, "detail": detail, "queue": queue, "score": score,
                       "ts": int(time.time() * 1000)}).encode()


async def release_holder(redis: Redis, holder: str, pool: str) -> int:
    """Release every job lease of a dead worker process at once; return how many it held."""
    released = await redis.eval(RELEASE_HOLDER_LUA, 1, keys.held_jobs(holder), holder,  # type: ignore[misc]
                                jobs.in_progress_key(""), keys.tenant_leases(""), keys.wakeup_channel(pool))
    return int(released)
