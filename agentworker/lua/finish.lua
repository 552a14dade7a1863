-- End one run of a claimed job, if its lease is still ours.
-- KEYS  1 in-progress  2 result  3 retry  4 job  5 arq:abort  6 running  7 attempt  8 held
--       [9 tenant leases]
-- ARGV  1 job id  2 holder  3 mode: 'done' | 'retry' | 'requeue'  4 result ('' = none)
--       5 result ttl ms ('' = keep forever)  6 score to queue it again at ('retry', 'requeue')
--       7 tenant lease member  8 q ({pool}:{shard})
-- 'done' ends the job (result written; job, retry, attempt and in-progress keys gone); 'retry' puts it
-- back in its tenant's queue at its new due time; 'requeue' puts it back at its old place without
-- spending a try (a drain cancelled it). Returns 0 if another holder has taken the job over (nothing is
-- written but our own bookkeeping), else 1.
redis.call('SREM', KEYS[8], ARGV[1])
if KEYS[9] then redis.call('ZREM', KEYS[9], ARGV[7]) end
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[6], ARGV[1])
local now = now_ms()
local q, id, mode = ARGV[8], ARGV[1], ARGV[3]
if mode == 'done' then
  if ARGV[4] ~= '' then
    if ARGV[5] == '' then redis.call('SET', KEYS[2], ARGV[4])
    else redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5]) end
  end
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[7])
  redis.call('ZREM', KEYS[5], id)
  local tenant = tenant_of(id)
  -- Our lease may have lapsed (a stalled loop) and a claim put the job back in its tenant's queue before
  -- anyone took it over: this outcome stands, so that copy is withdrawn (its record is gone now).
  if tenant then redis.call('ZREM', tq_key(q, tenant), id) end
  if KEYS[9] and tenant then activate(q, tenant, now, true) end  -- a capped tenant has a free slot
  return 1
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[7], 'holder')
if mode == 'requeue' then
  local tries = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
  if tries > 0 then redis.call('SET', KEYS[3], tries - 1, 'KEEPTTL') end
end
requeue(q, id, tonumber(ARGV[6]), now)
return 1
