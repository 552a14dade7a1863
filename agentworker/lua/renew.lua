-- Renew every lease one worker process holds.
-- KEYS  1 held  then per job: its in-progress key and its shard's running set  then the tenant leases
-- ARGV  1 holder  2 job lease ttl ms  3 number of jobs  4 tenant lease ttl ms  the job ids
--       the tenant lease members
-- Returns the ids of jobs that are no longer ours (their lease lapsed, or another holder has it).
local holder, ttl, n, tenant_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local lost = {}
for i = 1, n do
  local lease, running, id = KEYS[2 * i], KEYS[2 * i + 1], ARGV[4 + i]
  if redis.call('GET', lease) == holder then
    redis.call('PEXPIRE', lease, ttl)
    redis.call('ZADD', running, 'XX', now + ttl, id)
  else
    table.insert(lost, id)
  end
end
if n > 0 then redis.call('PEXPIRE', KEYS[1], ttl * 3) end
for j = 2 * n + 2, #KEYS do
  redis.call('ZADD', KEYS[j], 'XX', now + tenant_ttl, ARGV[4 + n + (j - 2 * n - 1)])
  redis.call('PEXPIRE', KEYS[j], tenant_ttl * 2)
end
return lost
