-- A tenant's model calls in flight (llm_concurrency): slots are leases that lapse unless renewed, so a
-- killed worker's slot comes back within the lease TTL (agentworker/llm_budget.py).
-- KEYS  1 slots (zset: call id -> lease expiry ms)
-- ARGV  1 'acquire' | 'renew' | 'release'   2 call id   3 limit   4 lease ttl ms
-- Returns 1 (acquired, renewed, released) or 0 (all slots taken; a renewal of a lease that lapsed).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
if ARGV[1] == 'release' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'renew' then
  local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return renewed
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
