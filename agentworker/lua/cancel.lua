-- Cancel one job (agentworker.job_control.cancel_job), atomically.
-- KEYS  1 job  2 result  3 in-progress  4 arq:abort (the cancel requests)  5 pending:{tenant}  6 retry
--       7 attempt
-- ARGV  1 job id  2 the cancelled result record  3 result ttl ms ('' = keep forever)  4 who asks
--       5... the shards ({pool}:{shard}) where the job may be queued
-- A job in one of those queues (its tenant's queue or the shard's inbox) is removed at once: its record,
-- retry counter and attempt go, it leaves its tenant's pending set and ARGV[2] becomes its result. A
-- running job (its lease is held) gets a cancel request (member of arq:abort, scored by when it was first
-- asked): its worker ends it. A job that exists but is in none of those places (a lapsed lease not yet
-- put back) gets the request too: the claim that takes it next finishes it as cancelled.
-- Returns {'cancelled', q} | {'running', request ms} | {'requested', request ms} | {'finished'} |
--         {'not_found'}
local id = ARGV[1]
if redis.call('EXISTS', KEYS[2]) == 1 then return {'finished'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
local now = now_ms()
local function request(kind)
  redis.call('ZADD', KEYS[4], 'NX', now, id)
  if redis.call('EXISTS', KEYS[7]) == 1 then redis.call('HSET', KEYS[7], 'cancel_by', ARGV[4]) end
  return {kind, redis.call('ZSCORE', KEYS[4], id)}
end
if redis.call('EXISTS', KEYS[3]) == 1 then return request('running') end
local tenant = tenant_of(id)
local found = nil
for i = 5, #ARGV do
  local q = ARGV[i]
  if tenant and redis.call('ZREM', tq_key(q, tenant), id) == 1 then
    activate(q, tenant, now, false)
    found = q
    break
  end
  if redis.call('ZREM', '%AW%queue:' .. q, id) == 1 then
    found = q
    break
  end
end
if not found then return request('requested') end
if ARGV[3] == '' then redis.call('SET', KEYS[2], ARGV[2])
else redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
redis.call('DEL', KEYS[1], KEYS[6], KEYS[7])
redis.call('ZREM', KEYS[5], id)
redis.call('ZREM', KEYS[4], id)
return {'cancelled', found}
