-- A tenant's model-token budget over a sliding window: reserve an estimate before a call, settle it
-- with the reported usage after (agentworker/llm_budget.py).
-- KEYS  1 log (zset: call id -> reservation time ms)  2 amounts (hash: call id -> tokens)
--       3 total (string: the sum of the amounts in the log)  4 exhausted flag (string)
-- ARGV  1 'reserve' | 'settle'   2 call id   3 tokens (the estimate; the reported usage)
--       4 budget (tokens per window)   5 window ms
-- reserve: {1, total after, 0, 0} reserved; {0, ms until the estimate fits, first (1: the first refusal
--          in this window: tell it), total} refused (nothing written but the flag).
-- settle:  {1, total after, 0, 0}; a call no longer in the log (it outlived its window) changes nothing.
-- Entries leave the log a window after their reservation (the sum follows), so the tokens reserved in
-- any window of that length never exceed the budget; a call that reports more than its estimate can
-- go over by its excess.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[5])
local total = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window, 'LIMIT', 0, 500)
for _, id in ipairs(old) do
  total = total - (tonumber(redis.call('HGET', KEYS[2], id) or '0') or 0)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
end
if total < 0 or redis.call('ZCARD', KEYS[1]) == 0 then total = 0 end
local amount = math.max(0, math.floor(tonumber(ARGV[3])))
local function save()
  redis.call('SET', KEYS[3], total, 'PX', window * 2)
  redis.call('PEXPIRE', KEYS[1], window * 2)
  redis.call('PEXPIRE', KEYS[2], window * 2)
end
if ARGV[1] == 'reserve' then
  local budget = tonumber(ARGV[4])
  if total + amount > budget then
    -- when do enough of the oldest reservations leave the window for this one to fit?
    local wait, freed = window, 0
    local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      freed = freed + (tonumber(redis.call('HGET', KEYS[2], entries[i]) or '0') or 0)
      if total - freed + amount <= budget then
        wait = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    local first = redis.call('SET', KEYS[4], '1', 'NX', 'PX', window) and 1 or 0
    if #old > 0 then save() end
    return {0, math.max(1, wait), first, total}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], amount)
  total = total + amount
  save()
  return {1, total, 0, 0}
end
local reserved = redis.call('HGET', KEYS[2], ARGV[2])
if reserved then
  total = total - tonumber(reserved) + amount
  redis.call('HSET', KEYS[2], ARGV[2], amount)
end
save()
return {1, total, 0, 0}
