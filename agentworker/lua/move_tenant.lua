-- Move every queued job of one tenant from one shard to another (a reroute: docs/supervisor.md).
-- KEYS  1 old tq   2 new tq   3 old ready   4 old waiting   5 old capped
--       6 new ready   7 new waiting   8 new capped   9 new vclock
-- ARGV  1 tenant id   2 wake-up channel of the new pool ('' : none)   3 the new shard's name
--       (agentworker:queue:{pool}:{shard}, the wake-up message)   4 the new shard's q ({pool}:{shard})
-- (KEYS 6-9 are declared for the new shard's sets; `activate` of _dispatch.lua names the same ones from q.)
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
local became_ready = activate(ARGV[4], tenant, now_ms(), false)
if became_ready and ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return moved
