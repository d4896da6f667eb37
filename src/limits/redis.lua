-- Tollgate's shared limiter: one script per operation, each prefixed with these helpers.
-- Every key shares one hash tag, so the whole limiter lives in one slot and a script touches
-- every scope of a request atomically.
--
-- A scope is a hash:  pk       the budget's period kind (daily, monthly, none, ...)
--                     ps, pe   the budget period it counts (Unix ms)
--                     spent    nano-dollars booked in that period
--                     res      nano-dollars reserved by requests in flight
--                     inf      requests in flight
--                     rq, rqt  the requests-per-minute bucket's level and when it was set
--                     it, itt  input tokens per minute, likewise
--                     ot, ott  output tokens per minute, likewise
-- A lease is a string (JSON: the worst case, as a string, and per scope whether it reserved
-- budget and a slot), listed in the `leases` sorted set by expiry. A gateway renews its leases
-- while their requests run; a lease that expires (its gateway died) gives its reservation back
-- and becomes `expired`. Settling deletes the lease: a settlement retried after a lost answer
-- finds nothing and books nothing twice.
--
-- Time is Redis's own (TIME), never a gateway's: one gateway's clock running ahead must not
-- expire the others' leases.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function lease_key(leases, id)
  -- `{p}:leases` -> `{p}:l:ID`
  return string.sub(leases, 1, -7) .. 'l:' .. id
end

-- Takes `by` (an integer as a string: Lua prints large numbers in exponent form, which
-- HINCRBY refuses) from an integer field, never below zero.
local function take(key, field, by)
  if by == '0' then return end
  if redis.call('HINCRBY', key, field, '-' .. by) < 0 then
    redis.call('HSET', key, field, 0)
  end
end

local function give_back(record)
  if record == 'expired' then return end
  local r = cjson.decode(record)
  for _, s in ipairs(r.s) do
    if s.b == 1 then take(s.k, 'res', r.w) end
    if s.c == 1 then take(s.k, 'inf', '1') end
  end
end

-- Releases what expired leases still hold (a bounded number per call). Each leaves a marker
-- for a day, so that a settlement arriving late still books its spend, once. A record that
-- cannot be read is dropped rather than left to fail every later call.
local function purge(leases, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for _, id in ipairs(expired) do
    local key = lease_key(leases, id)
    local record = redis.call('GET', key)
    if record then pcall(give_back, record) end
    redis.call('SET', key, 'expired', 'PX', 86400000)
    redis.call('ZREM', leases, id)
  end
end

-- A token bucket's level now: full when never used, else refilled at `cap` per minute.
local function level(l, t, cap, now)
  if not l then return cap end
  local v = tonumber(l) + (now - tonumber(t)) * cap / 60000
  if v > cap then v = cap end
  return v
end

-- Brings a budgeted scope to the period the caller names (kind `pk`, from `ps` to `pe`): a
-- scope never counted starts it from zero (a seed from the ledger gave it its spend before, if
-- it had any); a later period of the same kind starts from zero. A scope counted under another
-- kind of period (a budget whose period changed, while gateways disagree during a rollout)
-- keeps what it counts until that period ends: only a seed from the ledger moves it, so
-- gateways of two configs never reset each other's spend. Returns the spend and the end.
local function roll(key, pk, ps, pe, now)
  local h = redis.call('HMGET', key, 'pk', 'ps', 'pe', 'spent')
  local stored, ends = tonumber(h[2]), tonumber(h[3])
  if stored == nil or (h[1] == pk and stored < tonumber(ps)) or (h[1] ~= pk and now >= ends) then
    redis.call('HSET', key, 'pk', pk, 'ps', ps, 'pe', pe, 'spent', 0)
    return '0', tonumber(pe)
  end
  return h[4] or '0', ends
end

-- A budgeted scope outlives its period by a day (reports read it); a lifetime one never
-- expires; a scope with only limits is forgotten after `idle` unused, never sooner than
-- another of its uses asked.
local function keep(key, budgeted, ends, idle)
  if budgeted then
    if ends < 9e15 then redis.call('PEXPIREAT', key, ends + 86400000) else redis.call('PERSIST', key) end
  elseif redis.call('HEXISTS', key, 'ps') == 0 then
    local ttl = redis.call('PTTL', key)
    if ttl ~= -1 and ttl < idle then redis.call('PEXPIRE', key, idle) end
  end
end
