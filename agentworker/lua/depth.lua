-- How many jobs one shard holds, for /status, /metrics and autoscaling.
-- KEYS  1 ready  2 waiting  3 capped  4 the shard's inbox   ARGV  1 q  2 most tenants to count per state
-- Returns {due, total, runnable}: due = queued and due now; total = queued (due or later); runnable = due
-- and not held back by its tenant's max_concurrency (capped tenants' jobs are due but cannot start).
-- Cost: one ZCARD/ZCOUNT per tenant with queued work (bounded by ARGV[2] per state), never per job.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local most = tonumber(ARGV[2])
local due = redis.call('ZCOUNT', KEYS[4], '-inf', now)
local total = redis.call('ZCARD', KEYS[4])
local runnable = due
for state = 1, 3 do
  for _, tenant in ipairs(redis.call('ZRANGE', KEYS[state], 0, most - 1)) do
    local tq = '%AW%tq:' .. ARGV[1] .. ':' .. tenant
    local d = redis.call('ZCOUNT', tq, '-inf', now)
    due = due + d
    total = total + redis.call('ZCARD', tq)
    if state ~= 3 then runnable = runnable + d end
  end
end
return {due, total, runnable}
