-- ADMIT: all of a request's scopes, or none.
-- KEYS: epoch, leases, the new lease, the held lease (or the new one again), scope...
-- ARGV: lease ms, lease id, held lease id ('' for none), worst, input, output, scope idle TTL
--       (ms), then per scope: budget limit (-1: none), period kind, period start, period end,
--       rpm, input tpm, output tpm, concurrency (-1: none), held (1/0).
-- Returns {'ok', epoch, per scope its spend and reservations now ('' without a budget)}: what
-- a gateway needs to count on its own share if Redis stops answering; {'reseed'} (the data
-- was lost: seed from the ledger first); or {'refuse', scope index, reason, numbers...} (a
-- budget's: spent, reserved, period end, epoch).
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  return {'reseed'}
end
local now = now_ms()
purge(KEYS[2], now)
local worst, input, output = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local idle = tonumber(ARGV[7])
-- The slot taken before the body was read is transferred only if its lease is still there
-- (one that expired gave its slot back: the scope is counted afresh).
local held_record = ARGV[3] ~= '' and redis.call('GET', KEYS[4])
local held_alive = held_record and held_record ~= 'expired'
local n = #KEYS - 4
local plans = {}
for i = 1, n do
  local key = KEYS[4 + i]
  local o = 7 + (i - 1) * 9
  local limit = tonumber(ARGV[o + 1])
  local rpm, itpm, otpm = tonumber(ARGV[o + 5]), tonumber(ARGV[o + 6]), tonumber(ARGV[o + 7])
  local conc, held = tonumber(ARGV[o + 8]), ARGV[o + 9] == '1' and held_alive
  local p = {key = key, count = not held}
  if limit >= 0 then
    local spent, ends = roll(key, ARGV[o + 2], ARGV[o + 3], ARGV[o + 4], now)
    local res = redis.call('HGET', key, 'res') or '0'
    if tonumber(spent) + worst > limit then
      return {'refuse', i, 'budget', spent, res, tostring(ends), epoch}
    end
    if tonumber(spent) + tonumber(res) + worst > limit then
      return {'refuse', i, 'budget_reserved', spent, res, tostring(ends), epoch}
    end
    p.budget = true
    p.ends = ends
    -- As an integer: tostring would print large sums in exponent form.
    p.used = string.format('%.0f', tonumber(spent) + tonumber(res) + worst)
  end
  local h = redis.call('HMGET', key, 'inf', 'rq', 'rqt', 'it', 'itt', 'ot', 'ott')
  if rpm >= 0 then
    local lv = level(h[2], h[3], rpm, now)
    if lv < 1 then return {'refuse', i, 'rpm', tostring(lv)} end
    p.rq = lv - 1
  end
  -- A request larger than the whole minute's allowance needs a full bucket, not a bigger one.
  if itpm >= 0 then
    local lv = level(h[4], h[5], itpm, now)
    if lv < math.min(input, itpm) then return {'refuse', i, 'input_tpm', tostring(lv)} end
    p.it = lv - input
  end
  if otpm >= 0 then
    local lv = level(h[6], h[7], otpm, now)
    if lv < math.min(output, otpm) then return {'refuse', i, 'output_tpm', tostring(lv)} end
    p.ot = lv - output
  end
  if conc >= 0 and not held then
    if tonumber(h[1] or '0') >= conc then return {'refuse', i, 'concurrency'} end
  end
  plans[i] = p
end
-- Every scope has room: take it on all of them.
local record = {w = ARGV[4], s = {}}
local answer = {'ok', epoch}
for i = 1, n do
  local p = plans[i]
  if p.budget then redis.call('HINCRBY', p.key, 'res', ARGV[4]) end
  if p.rq then redis.call('HSET', p.key, 'rq', p.rq, 'rqt', now) end
  if p.it then redis.call('HSET', p.key, 'it', p.it, 'itt', now) end
  if p.ot then redis.call('HSET', p.key, 'ot', p.ot, 'ott', now) end
  if p.count then redis.call('HINCRBY', p.key, 'inf', 1) end
  keep(p.key, p.budget, p.ends, idle)
  table.insert(record.s, {k = p.key, b = p.budget and 1 or 0, c = 1})
  table.insert(answer, p.used or '')
end
if ARGV[3] ~= '' then
  -- The held slot is this lease's now (or was given back already).
  redis.call('DEL', KEYS[4])
  redis.call('ZREM', KEYS[2], ARGV[3])
end
redis.call('SET', KEYS[3], cjson.encode(record))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[2])
return answer
