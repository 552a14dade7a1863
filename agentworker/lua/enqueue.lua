-- agentworker: admission + enqueue of one job, atomically (docs/protocol.md is its description).
--
-- KEYS  1 arq:job:{id}   2 arq:result:{id}   3 agentworker:tq:{pool}:{shard}:{tenant}
--       4 agentworker:pending:{tenant}   5 agentworker:rate:{tenant}
--       6 agentworker:ready:{pool}:{shard}   7 agentworker:waiting:{pool}:{shard}
--       8 agentworker:capped:{pool}:{shard}   9 agentworker:vclock:{pool}:{shard}
-- ARGV  1 job id   2 job record (JSON)   3 due time (ms)   4 ms from now to keep the record unclaimed
--       (the delay until it is due plus a margin: the Python client gives delay + one day)
--       5 max_pending (-1: none)   6 rate_limit count (0: none)   7 rate_limit period (ms)
--       8 wake-up channel agentworker:wakeup:{pool} ('' : none)   9 tenant id
--       10 shard name agentworker:queue:{pool}:{shard} (the wake-up message)
-- Due times are compared with Redis' clock (TIME): keep producers' clocks in sync with it (NTP).
-- A refusal is counted in the hash agentworker:refusals ("{pool} max_pending" / "{pool} rate_limit" ->
-- count; the pool read from KEYS[6]), which the supervisor exports as agentworker_admission_refusals_total.
-- Returns {1, ''} enqueued; {0, ''} the id exists already (its job or result): nothing done;
--         {-1, pending count} over max_pending; {-2, ms until a token} over rate_limit.
for i = 3, 7 do
  if not tonumber(ARGV[i]) then return redis.error_reply('ARGV[' .. i .. '] must be a number') end
end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return {0, ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_pending = tonumber(ARGV[5])
if max_pending >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  local n = redis.call('ZCARD', KEYS[4])
  if n >= max_pending then
    redis.call('HINCRBY', 'agentworker:refusals', (string.match(KEYS[6], ':ready:([^:]+):') or '?') .. ' max_pending', 1)
    return {-1, tostring(n)}
  end
end
local rate = tonumber(ARGV[6])
if rate > 0 then
  local period = tonumber(ARGV[7])
  local bucket = redis.call('HMGET', KEYS[5], 'tokens', 'ts')
  local tokens = tonumber(bucket[1]) or rate
  local ts = tonumber(bucket[2]) or now
  if now > ts then
    tokens = math.min(rate, tokens + (now - ts) * rate / period)
    ts = now
  end
  if tokens < 1 then
    redis.call('HINCRBY', 'agentworker:refusals', (string.match(KEYS[6], ':ready:([^:]+):') or '?') .. ' rate_limit', 1)
    return {-2, tostring(math.ceil((1 - tokens) * period / rate))}
  end
  redis.call('HSET', KEYS[5], 'tokens', tostring(tokens - 1), 'ts', tostring(ts))
  redis.call('PEXPIRE', KEYS[5], math.ceil(period * 2))
end
local expires = tonumber(ARGV[4])
local due = tonumber(ARGV[3])
local tenant = ARGV[9]
redis.call('SET', KEYS[1], ARGV[2], 'PX', expires)
-- A cancel request left from an earlier job of this id (one that expired unclaimed) is not for this one.
redis.call('ZREM', 'arq:abort', ARGV[1])
redis.call('ZADD', KEYS[3], due, ARGV[1])
redis.call('ZADD', KEYS[4], now + expires, ARGV[1])
-- the set lives as long as its longest-lived entry (a later, shorter job must not cut it)
if redis.call('PTTL', KEYS[4]) < expires then redis.call('PEXPIRE', KEYS[4], expires) end
-- The tenant is in at most one of ready / waiting / capped. A capped tenant stays capped (its next
-- finish looks again); a ready one has work already; otherwise it becomes ready or waiting.
local became_ready = false
if not redis.call('ZSCORE', KEYS[6], tenant) and not redis.call('ZSCORE', KEYS[8], tenant) then
  local head = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  local first = tonumber(head[2])
  if first <= now then
    redis.call('ZREM', KEYS[7], tenant)
    redis.call('ZADD', KEYS[6], tonumber(redis.call('GET', KEYS[9]) or '0'), tenant)
    became_ready = true
  else
    redis.call('ZADD', KEYS[7], first, tenant)
  end
end
-- Wake-ups are coalesced: only a tenant that just became ready can give an idle worker work.
if became_ready and ARGV[8] ~= '' then
  redis.call('PUBLISH', ARGV[8], ARGV[10])
end
return {1, ''}
