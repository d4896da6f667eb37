-- Tollgate's shared limiter: one script per operation, each prefixed with these helpers.
-- Every key shares one hash tag, so the whole limiter lives in one slot: a script touches
-- every scope of a request atomically, on a single Redis, Valkey, or a Redis Cluster.
--
-- A scope is a hash:  ps, pe   the budget period it counts (Unix ms)
--                     spent    nano-dollars booked in that period
--                     res      nano-dollars reserved by requests in flight
--                     inf      requests in flight
--                     rq, rqt  the requests-per-minute bucket's level and when it was set
--                     it, itt  input tokens per minute, likewise
--                     ot, ott  output tokens per minute, likewise
-- A lease is a string (JSON: the worst case, as a string, and per scope whether it reserved budget and a
-- slot), listed in the `leases` sorted set by expiry. A gateway renews its leases while their
-- requests run; a lease that expires (its gateway died) gives its reservation back.

local function lease_key(leases, id)
  -- `{p}:leases` -> `{p}:l:ID`
  return string.sub(leases, 1, -7) .. 'l:' .. id
end

-- Takes `by` (an integer as a string: Lua's numbers print large ones in exponent form, which
-- HINCRBY refuses) from an integer field, never below zero.
local function take(key, field, by)
  if redis.call('HINCRBY', key, field, '-' .. by) < 0 then
    redis.call('HSET', key, field, 0)
  end
end

local function give_back(record)
  local r = cjson.decode(record)
  for _, s in ipairs(r.s) do
    if s.b == 1 then take(s.k, 'res', r.w) end
    if s.c == 1 then take(s.k, 'inf', '1') end
  end
end

-- Releases what expired leases still hold (a bounded number per call).
local function purge(leases, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for _, id in ipairs(expired) do
    local key = lease_key(leases, id)
    local record = redis.call('GET', key)
    if record then give_back(record) end
    redis.call('DEL', key)
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
