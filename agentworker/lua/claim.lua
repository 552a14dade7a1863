-- Claim up to n due jobs of one shard, fairly between its tenants, in one round trip.
-- KEYS  1 ready  2 waiting  3 capped  4 running  5 vclock  6 held:{holder}  7 dead:{pool}
--       8 the shard's inbox (agentworker:queue:{pool}:{shard})  9 limits:{pool}
-- ARGV  1 q ({pool}:{shard})  2 n  3 job lease ttl ms  4 holder  5 max_crash_retries
--       6 tenant lease ttl ms  7 attempt ttl ms  8 retry counter ttl s  9 ms before a capped tenant is
--       looked at again without a finish
-- Returns a list of entries:
--   {'run' | 'poisoned', id, score, record, try, crashes, crashed (0/1), tenant lease taken (0/1),
--    when its cancel was requested (ms; '' for none: arq:abort, agentworker.job_control)}
--   {'dead', id, reason}          moved to the dead letters (its record is missing or not a string)
--   {'refused', id, reason}       adopted from the inbox over its tenant's max_pending: the worker fails it
--   {'capped', tenant}            the tenant is at its max_concurrency: its jobs wait (deferred, no try spent)
local q, n = ARGV[1], tonumber(ARGV[2])
local lease, holder = tonumber(ARGV[3]), ARGV[4]
local max_crashes, tenant_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local out = {}

local function dead(id, reason, detail, score)
  redis.call('HSET', KEYS[7], id, cjson.encode({reason = reason, detail = detail, queue = KEYS[8],
                                                score = score, ts = now}))
  local tenant = tenant_of(id)
  if tenant then redis.call('ZREM', '%AW%pending:' .. tenant, id) end
  table.insert(out, {'dead', id, reason})
end

local limits = {}
local function limits_of(tenant)
  if limits[tenant] then return unpack(limits[tenant]) end
  local v = redis.call('HGET', KEYS[9], tenant) or redis.call('HGET', KEYS[9], '*')
  local cap, weight, max_pending = 0, 1, -1
  if v then
    local c, w, m = string.match(v, '^(%S+) (%S+) (%S+)$')
    cap, weight, max_pending = tonumber(c) or 0, tonumber(w) or 1, tonumber(m) or -1
  end
  -- a tenant of the tenant store: its stored plan's keys, then its overrides, over the file's
  local stored = redis.call('HMGET', '%AW%tenant:' .. tenant, 'plan', 'claim')
  local layers = {}
  if stored[1] and stored[1] ~= '' then layers[1] = redis.call('HGET', KEYS[9], 'plan:' .. stored[1]) end
  if stored[2] then table.insert(layers, stored[2]) end
  for _, layer in pairs(layers) do
    if layer then
      local c, w, m = string.match(layer, '^(%S+) (%S+) (%S+)$')
      if c and c ~= '-' then cap = tonumber(c) or cap end
      if w and w ~= '-' then weight = tonumber(w) or weight end
      if m and m ~= '-' then max_pending = tonumber(m) or max_pending end
    end
  end
  if weight <= 0 then weight = 1 end
  limits[tenant] = {cap, weight, max_pending}
  return cap, weight, max_pending
end

-- 1. Leases that lapsed (a host gone, nobody released them): back to their tenant's queue. The claim
--    that takes them again sees the unfinished attempt and counts a crash.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 50)) do
  local ttl = redis.call('PTTL', '%INPROG%' .. id)
  if ttl > 0 then
    redis.call('ZADD', KEYS[4], now + ttl, id)
  else
    redis.call('ZREM', KEYS[4], id)
    local score = tonumber(redis.call('HGET', '%ATTEMPT%' .. id, 'score')) or now
    requeue(q, id, score, now)
  end
end

-- 2. Jobs a plain ARQ producer put in the shard's inbox: adopted into their tenant's queue, counted in
--    its pending jobs (max_pending); over it they are refused.
local inbox = redis.call('ZRANGE', KEYS[8], 0, n - 1, 'WITHSCORES')
for i = 1, #inbox, 2 do
  local id, score = inbox[i], tonumber(inbox[i + 1])
  redis.call('ZREM', KEYS[8], id)
  local tenant = tenant_of(id)
  if string.find(id, '[\128-\255]') then
    dead(id, 'non_utf8_id', 'the job id has bytes that are not ASCII (job ids are printable ASCII)', score)
  elseif not tenant or not string.match(id, '^[\33-\126]+$') then
    dead(id, 'bad_id', 'the job id is not of the form {tenant}:{task}:{key} in printable ASCII', score)
  else
    local _, _, max_pending = limits_of(tenant)
    local pending = '%AW%pending:' .. tenant
    redis.call('ZREMRANGEBYSCORE', pending, '-inf', now)
    if max_pending >= 0 and redis.call('ZCARD', pending) >= max_pending then
      redis.call('HINCRBY', '%AW%refusals', string.match(q, '^([^:]+):') .. ' max_pending', 1)
      table.insert(out, {'refused', id, 'tenant ' .. tenant .. ' is at its max_pending of ' .. max_pending})
    else
      local ttl = redis.call('PTTL', '%JOB%' .. id)
      redis.call('ZADD', pending, now + (ttl > 0 and ttl or 86400000), id)
      redis.call('ZADD', tq_key(q, tenant), score, id)
      activate(q, tenant, now, false)
    end
  end
end

-- 3. Tenants whose first job became due, and capped tenants due for another look.
for _, tenant in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, n + 16)) do
  redis.call('ZREM', KEYS[2], tenant)
  activate(q, tenant, now, false)
end
for _, tenant in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, n + 16)) do
  activate(q, tenant, now, true)
end

-- 4. Weighted fair share: the ready tenant with the smallest virtual time goes next; each job it starts
--    advances its time by 1 / weight. A tenant becoming ready starts at the shard's clock (the time of
--    the last tenant served), so it gets no credit for having been idle. Capped tenants leave the ready
--    set (O(1)) until one of their jobs finishes; a claim never reads any tenant's backlog.
local guard = 4 * n + 16
local added = 0
while added < n and guard > 0 do
  guard = guard - 1
  local top = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #top == 0 then break end
  local tenant, vt = top[1], tonumber(top[2])
  local tq = tq_key(q, tenant)
  local head = redis.call('ZRANGE', tq, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', KEYS[1], tenant)
  elseif tonumber(head[2]) > now then
    redis.call('ZREM', KEYS[1], tenant)
    redis.call('ZADD', KEYS[2], head[2], tenant)
  else
    local cap, weight = limits_of(tenant)
    local leases = '%AW%leases:' .. tenant
    local at_cap = false
    if cap > 0 then
      redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
      at_cap = redis.call('ZCARD', leases) >= cap
    end
    if at_cap then
      redis.call('ZREM', KEYS[1], tenant)
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[9]), tenant)
      table.insert(out, {'capped', tenant})
    else
      local id, score = head[1], tonumber(head[2])
      redis.call('ZREM', tq, id)
      redis.call('SET', KEYS[5], vt)
      redis.call('ZADD', KEYS[1], vt + 1 / weight, tenant)
      local kind = redis.call('TYPE', '%JOB%' .. id)['ok']
      if kind ~= 'string' then
        if kind == 'none' then
          dead(id, 'missing_record', 'the job record ' .. '%JOB%' .. id .. ' does not exist (expired or deleted)', score)
        else
          dead(id, 'wrong_type', 'the job record ' .. '%JOB%' .. id .. ' is a Redis ' .. kind .. ', not a string', score)
        end
      else
        local leased = 0
        if cap > 0 then
          redis.call('ZADD', leases, now + tenant_ttl, id .. '@' .. holder)
          redis.call('PEXPIRE', leases, tenant_ttl * 2)
          leased = 1
        end
        redis.call('SET', '%INPROG%' .. id, holder, 'PX', lease)
        redis.call('ZADD', KEYS[4], now + lease, id)
        redis.call('SADD', KEYS[6], id)
        redis.call('PEXPIRE', KEYS[6], lease * 3)
        redis.call('ZREM', '%AW%pending:' .. tenant, id)
        local attempt, retry = '%ATTEMPT%' .. id, '%RETRY%' .. id
        local tries = tonumber(redis.call('GET', retry) or '0') or 0
        local crashes = tonumber(redis.call('HGET', attempt, 'crashes') or '0') or 0
        local crashed = 0
        if redis.call('HEXISTS', attempt, 'holder') == 1 then
          -- the last attempt never finished: its worker died. That is a crash, and its try is given back.
          crashed = 1
          crashes = redis.call('HINCRBY', attempt, 'crashes', 1)
          if tries > 0 then tries = tries - 1 end
        end
        redis.call('HSET', attempt, 'holder', holder, 'since', now, 'q', q, 'score', score)
        redis.call('PEXPIRE', attempt, ARGV[7])
        local verdict = 'run'
        if crashes > max_crashes then
          verdict = 'poisoned'
          tries = math.max(tries, 1)
        else
          tries = tries + 1
          redis.call('SET', retry, tries, 'EX', ARGV[8])
        end
        local cancel_at = redis.call('ZSCORE', '%ABORT%', id) or ''
        table.insert(out, {verdict, id, score, redis.call('GET', '%JOB%' .. id), tries, crashes, crashed, leased,
                           cancel_at})
        added = added + 1
      end
      if redis.call('ZCARD', tq) == 0 then redis.call('ZREM', KEYS[1], tenant) end
    end
  end
end
return out
