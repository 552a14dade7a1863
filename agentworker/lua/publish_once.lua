-- Publish an event once per event id: append it to the tenant's stream and publish it on the tenant's
-- channel, unless an event with that id was published already (a re-publication after a crash, or by
-- the outbox relay). Both writes and the id's record happen together or not at all.
-- KEYS  1 the tenant's stream  2 its published ids (sorted set: event id -> publication number, so the
--       oldest are forgotten first even when many share a millisecond)
-- ARGV  1 the tenant's channel  2 the event id  3 the event's JSON  4 the stream's MAXLEN (approximate)
--       5 ids remembered at most (the oldest are forgotten first)
-- Returns 1 when published, 0 when the id had been published already.
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  return 0
end
local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('ZADD', KEYS[2], (tonumber(newest[2]) or 0) + 1, ARGV[2])
local keep = tonumber(ARGV[5])
if redis.call('ZCARD', KEYS[2]) > keep then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(keep + 1))
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[3])
return 1
