-- Move a job this worker claimed but cannot read to the pool's dead letters, once.
-- KEYS  1 dead:{pool}  2 in-progress  3 attempt  4 held  5 running  [6 pending  7 tenant leases]
-- ARGV  1 raw job id  2 the dead letter (JSON)  3 holder  4 tenant lease member
-- Returns 0 if the job is not (or no longer) held by us, else 1.
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if KEYS[6] then redis.call('ZREM', KEYS[6], ARGV[1]) end
if KEYS[7] then redis.call('ZREM', KEYS[7], ARGV[4]) end
return 1
