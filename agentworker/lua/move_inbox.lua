-- Move entries of a shard that no longer exists from its inbox to their tenants' new shards' inboxes.
-- KEYS  1 the old inbox (agentworker:queue:{pool}:{shard})
-- ARGV  triples: job id, its new inbox, the wake-up channel of the new inbox's pool
-- An entry is moved only if it is still in the old inbox (nobody adopted it meanwhile), with its score;
-- each new inbox's pool is woken once. Returns the number of entries moved.
local moved, woken = 0, {}
for i = 1, #ARGV, 3 do
  local id, inbox, channel = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and inbox ~= KEYS[1] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', inbox, score, id)
    moved = moved + 1
    if not woken[inbox] then
      woken[inbox] = true
      redis.call('PUBLISH', channel, inbox)
    end
  end
end
return moved
