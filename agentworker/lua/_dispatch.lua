-- Shared by the worker-side scripts (claim, finish, release); prepended to each of them when loaded.
-- %AW%, %INPROG%, %ATTEMPT% are replaced by the key prefixes (agentworker/job_leases.py).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function shard_key(kind, q) return '%AW%' .. kind .. ':' .. q end
local function tq_key(q, tenant) return '%AW%tq:' .. q .. ':' .. tenant end
local function tenant_of(id) return string.match(id, '^([a-z0-9][a-z0-9_-]*):') end

-- Put a tenant that may have queued work where it belongs: ready (its first job is due), waiting (not
-- yet), or nowhere (no job). A ready tenant stays as it is. A capped one stays capped unless
-- `freed` (one of its slots was just freed): then it is looked at again now.
local function activate(q, tenant, now, freed)
  local ready, waiting, capped = shard_key('ready', q), shard_key('waiting', q), shard_key('capped', q)
  if redis.call('ZSCORE', ready, tenant) then return false end
  if redis.call('ZSCORE', capped, tenant) then
    if not freed then return false end
    redis.call('ZREM', capped, tenant)
  end
  local head = redis.call('ZRANGE', tq_key(q, tenant), 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', waiting, tenant)
    return false
  end
  local first = tonumber(head[2])
  if first <= now then
    redis.call('ZREM', waiting, tenant)
    redis.call('ZADD', ready, tonumber(redis.call('GET', shard_key('vclock', q)) or '0'), tenant)
    return true
  end
  redis.call('ZADD', waiting, first, tenant)
  return false
end

-- Put a claimed job back in its tenant's queue at `score` (a crash, a drain, a retry).
local function requeue(q, id, score, now)
  local tenant = tenant_of(id)
  if not tenant then return false end
  redis.call('ZADD', tq_key(q, tenant), score, id)
  return activate(q, tenant, now, true)
end
