-- ADMIT: all of a request's scopes, or none.
-- KEYS: epoch, leases, the new lease, the held lease (or the new one again), scope...
-- ARGV: now, lease expiry, lease id, held lease id ('' for none), worst, input, output, scope
--       TTL (ms, for scopes without a budget), then per scope: budget limit (-1: none), period
--       start, period end, rpm, input tpm, output tpm, concurrency (-1: none), held (1/0).
-- Returns {'ok'}, {'reseed'} (the data was lost: seed from the ledger first), or
-- {'refuse', scope index, reason, numbers...}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'reseed'}
end
local now = tonumber(ARGV[1])
purge(KEYS[2], now)
local worst, input, output = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local idle_ttl = tonumber(ARGV[8])
local n = #KEYS - 4
local plans = {}
for i = 1, n do
  local key = KEYS[4 + i]
  local o = 8 + (i - 1) * 8
  local limit, ps, pe = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  local rpm, itpm, otpm = tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5]), tonumber(ARGV[o + 6])
  local conc, held = tonumber(ARGV[o + 7]), ARGV[o + 8] == '1'
  local h = redis.call('HMGET', key, 'ps', 'pe', 'spent', 'res', 'inf', 'rq', 'rqt', 'it', 'itt', 'ot', 'ott')
  local p = {key = key, count = not held}
  if limit >= 0 then
    local spent = tonumber(h[3] or '0')
    local stored = tonumber(h[1])
    local ends = tonumber(h[2] or ARGV[o + 3])
    if stored == nil or stored < ps then
      -- A new period: the spend starts again (reservations in flight carry over).
      spent = 0
      ends = pe
      p.roll = {ARGV[o + 2], ARGV[o + 3]}
    end
    local res = tonumber(h[4] or '0')
    if spent + worst > limit then
      return {'refuse', i, 'budget', tostring(spent), tostring(res), tostring(ends)}
    end
    if spent + res + worst > limit then
      return {'refuse', i, 'budget_reserved', tostring(spent), tostring(res), tostring(ends)}
    end
    p.budget = true
    p.ends = ends
  end
  if rpm >= 0 then
    local lv = level(h[6], h[7], rpm, now)
    if lv < 1 then return {'refuse', i, 'rpm', tostring(lv)} end
    p.rq = lv - 1
  end
  -- A request larger than the whole minute's allowance needs a full bucket, not a bigger one.
  if itpm >= 0 then
    local lv = level(h[8], h[9], itpm, now)
    if lv < math.min(input, itpm) then return {'refuse', i, 'input_tpm', tostring(lv)} end
    p.it = lv - input
  end
  if otpm >= 0 then
    local lv = level(h[10], h[11], otpm, now)
    if lv < math.min(output, otpm) then return {'refuse', i, 'output_tpm', tostring(lv)} end
    p.ot = lv - output
  end
  if conc >= 0 and not held then
    if tonumber(h[5] or '0') >= conc then return {'refuse', i, 'concurrency'} end
  end
  plans[i] = p
end
-- Every scope has room: take it on all of them.
local record = {w = ARGV[5], s = {}}
for i = 1, n do
  local p = plans[i]
  if p.roll then redis.call('HSET', p.key, 'ps', p.roll[1], 'pe', p.roll[2], 'spent', 0) end
  if p.budget then redis.call('HINCRBY', p.key, 'res', ARGV[5]) end
  if p.rq then redis.call('HSET', p.key, 'rq', p.rq, 'rqt', now) end
  if p.it then redis.call('HSET', p.key, 'it', p.it, 'itt', now) end
  if p.ot then redis.call('HSET', p.key, 'ot', p.ot, 'ott', now) end
  if p.count then redis.call('HINCRBY', p.key, 'inf', 1) end
  -- A scope outlives its period by a day (reports read it), an unbudgeted one its idleness.
  if p.budget then
    if p.ends < 9e15 then redis.call('PEXPIREAT', p.key, p.ends + 86400000) else redis.call('PERSIST', p.key) end
  else
    redis.call('PEXPIRE', p.key, idle_ttl)
  end
  table.insert(record.s, {k = p.key, b = p.budget and 1 or 0, c = 1})
end
if ARGV[4] ~= '' then
  -- The held slot is this lease's now.
  redis.call('DEL', KEYS[4])
  redis.call('ZREM', KEYS[2], ARGV[4])
end
redis.call('SET', KEYS[3], cjson.encode(record))
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), ARGV[3])
return {'ok'}
