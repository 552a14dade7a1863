-- Publish the limits the claim script reads for one pool, unless a newer quota file published them.
-- KEYS  1 limits:{pool}   ARGV  1 version (ms: when the quota file was loaded)  2 digest of the file
--       then field, value pairs (tenant -> "{max_concurrency} {weight} {max_pending}", '*' the default)
-- The most recently loaded file wins: a process still running an older file (mid-rollout) does not
-- overwrite a newer one's limits. Returns 1 if written (or already these), 0 if kept newer ones.
local current = redis.call('HMGET', KEYS[1], '_version', '_digest')
if current[2] == ARGV[2] then return 1 end
if (tonumber(current[1]) or 0) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_version', ARGV[1], '_digest', ARGV[2])
local batch = {}
for i = 3, #ARGV, 2 do
  table.insert(batch, ARGV[i])
  table.insert(batch, ARGV[i + 1])
  if #batch >= 1000 then
    redis.call('HSET', KEYS[1], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('HSET', KEYS[1], unpack(batch)) end
return 1
