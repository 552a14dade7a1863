-- Write one tenant's tenant-store record, unless Redis already has that version or a newer one.
-- KEYS  1 agentworker:tenant:{id}
-- ARGV  1 version   2 entry JSON ({"plan", "overrides", "previous_queue"}; '' : the entry was removed)
--       3 plan ('' : none)   4 the claim layer of its overrides ("{max_concurrency} {weight} {max_pending}",
--       '-' for a key not overridden)   5 pool   6 shard   7 changes channel ('' : none)   8 tenant id
-- The claim script reads 'plan' and 'claim'; Python processes read 'v' and 'entry'; producers in other
-- languages may read 'pool' and 'shard' (the route under the quota file the writer had).
-- Returns 1 if written, 0 if Redis had this version or a newer one (changes reach Redis out of order:
-- the setter's own write and the tenant-sync copy race; the highest version wins).
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0') or 0
if current >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'entry', ARGV[2], 'plan', ARGV[3], 'claim', ARGV[4],
           'pool', ARGV[5], 'shard', ARGV[6])
if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
return 1
