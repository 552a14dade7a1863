-- Move every queued job of one tenant from one shard to another (a reroute: docs/supervisor.md).
-- KEYS  1 old tq   2 new tq   3 old ready   4 old waiting   5 old capped
--       6 new ready   7 new waiting   8 new capped   9 new vclock
-- ARGV  1 tenant id   2 wake-up channel of the new pool ('' : none)   3 the new shard's name
--       (agentworker:queue:{pool}:{shard}, the wake-up message)
-- Jobs keep their scores (due times), so their order and their deferrals survive the move. The tenant
-- leaves the old shard's state sets and, in the new one, becomes ready (first job due: at the shard's
-- virtual clock, like any tenant becoming ready) or waiting; a tenant the new shard already has as ready
-- or capped stays so. Running jobs are not touched: they finish in the old shard. Idempotent: a second
-- run finds the old queue gone and moves nothing. Returns the number of jobs moved.
if KEYS[1] == KEYS[2] then return 0 end
local tenant = ARGV[1]
local moved = redis.call('ZCARD', KEYS[1])
redis.call('ZREM', KEYS[3], tenant)
redis.call('ZREM', KEYS[4], tenant)
redis.call('ZREM', KEYS[5], tenant)
if moved == 0 then return 0 end
-- MIN: an id in both queues (it cannot be, ids are unique while queued) would keep its earlier due time.
redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MIN')
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local became_ready = false
if not redis.call('ZSCORE', KEYS[6], tenant) and not redis.call('ZSCORE', KEYS[8], tenant) then
  local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local first = tonumber(head[2])
  if first <= now then
    redis.call('ZREM', KEYS[7], tenant)
    redis.call('ZADD', KEYS[6], tonumber(redis.call('GET', KEYS[9]) or '0'), tenant)
    became_ready = true
  else
    redis.call('ZADD', KEYS[7], first, tenant)
  end
end
if became_ready and ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return moved
