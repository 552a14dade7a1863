-- Release every job lease of a dead worker process (the supervisor runs it when it reaps one).
-- KEYS  1 held:{holder}   ARGV  1 holder  2 wake-up channel of its pool
-- Its jobs go back to their tenants' queues at their old place (the next claim counts the crash), its
-- tenant leases are dropped, and the pool is woken. Returns how many job leases were released.
local holder = ARGV[1]
local now = now_ms()
local released = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local lease = '%INPROG%' .. id
  local tenant = tenant_of(id)
  if tenant then redis.call('ZREM', '%AW%leases:' .. tenant, id .. '@' .. holder) end
  if redis.call('GET', lease) == holder then
    redis.call('DEL', lease)
    local attempt = redis.call('HMGET', '%ATTEMPT%' .. id, 'q', 'score')
    if attempt[1] then
      redis.call('ZREM', shard_key('running', attempt[1]), id)
      requeue(attempt[1], id, tonumber(attempt[2]) or now, now)
    end
    released = released + 1
  end
end
redis.call('DEL', KEYS[1])
if released > 0 then redis.call('PUBLISH', ARGV[2], '*') end
return released
