-- The other operations, chosen by ARGV[1]; each is a few lines, so they share one script.
local op = ARGV[1]

if op == 'settle' then
  -- KEYS: leases, lease, scope...
  -- ARGV: op, lease id, cost, booked at (ms; 0: now), input reserved, input used, output
  --       reserved, output used, then per scope: period kind ('' for no budget), period
  --       start, period end, input tpm, output tpm (-1: none).
  -- Runs once per lease: a retry after a lost answer finds no lease and books nothing.
  local record = redis.call('GET', KEYS[2])
  if not record then
    return 0
  end
  local now = now_ms()
  -- Give back the reservation and the slot (an expired lease gave them back already).
  give_back(record)
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[2])
  local cost, at = ARGV[3], tonumber(ARGV[4])
  if at == 0 then at = now end
  local in_res, in_used = tonumber(ARGV[5]), tonumber(ARGV[6])
  local out_res, out_used = tonumber(ARGV[7]), tonumber(ARGV[8])
  for i = 3, #KEYS do
    local key = KEYS[i]
    local o = 8 + (i - 3) * 5
    if ARGV[o + 1] ~= '' then
      -- The cost counts in the period that contains its booking time, as in the ledger (a
      -- period that began since admission is rolled to first).
      local _, ends = roll(key, ARGV[o + 1], ARGV[o + 2], ARGV[o + 3], now)
      local ps = tonumber(redis.call('HGET', key, 'ps'))
      if cost ~= '0' and at >= ps and at < ends then redis.call('HINCRBY', key, 'spent', cost) end
    end
    local itpm, otpm = tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5])
    if itpm >= 0 then
      local l = redis.call('HGET', key, 'it')
      if l then redis.call('HSET', key, 'it', math.min(itpm, tonumber(l) + in_res - in_used)) end
    end
    if otpm >= 0 then
      local l = redis.call('HGET', key, 'ot')
      if l then redis.call('HSET', key, 'ot', math.min(otpm, tonumber(l) + out_res - out_used)) end
    end
  end
  return 1
end

if op == 'hold' then
  -- KEYS: leases, lease, scope.  ARGV: op, lease ms, lease id, concurrency, scope idle TTL.
  local now = now_ms()
  purge(KEYS[1], now)
  local conc = tonumber(ARGV[4])
  if conc >= 0 and tonumber(redis.call('HGET', KEYS[3], 'inf') or '0') >= conc then
    return 0
  end
  redis.call('HINCRBY', KEYS[3], 'inf', 1)
  keep(KEYS[3], false, 0, tonumber(ARGV[5]))
  redis.call('SET', KEYS[2], cjson.encode({w = '0', s = {{k = KEYS[3], b = 0, c = 1}}}))
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  return 1
end

if op == 'release' then
  -- KEYS: leases, lease.  ARGV: op, lease id.
  local record = redis.call('GET', KEYS[2])
  if record then
    give_back(record)
    redis.call('DEL', KEYS[2])
    redis.call('ZREM', KEYS[1], ARGV[2])
  end
  return 1
end

if op == 'renew' then
  -- KEYS: leases, nodes.  ARGV: op, lease ms, node id, lease id...
  -- Pushes the expiry of live leases forward; an expired (purged) one is not brought back.
  -- Also this gateway's heartbeat: returns how many gateways beat within two leases (the
  -- fleet a gateway shares limits with when Redis stops answering).
  local now = now_ms()
  local expiry = now + tonumber(ARGV[2])
  for i = 4, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', 'GT', expiry, ARGV[i])
  end
  redis.call('ZADD', KEYS[2], now + 2 * tonumber(ARGV[2]), ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  return redis.call('ZCARD', KEYS[2])
end

if op == 'credit' then
  -- KEYS: epoch, credit marker, scope...
  -- ARGV: op, epoch, then per scope: period kind, period start, period end, cost.
  -- Books what a gateway spent on its own share while Redis did not answer, into the period
  -- it was spent in (nothing, if Redis counts a later one now). Only into the data it was
  -- counted against: after Redis lost its data (another epoch), the ledger's seed holds it.
  -- Returns 1 (booked), 2 (booked before: a retry after a lost answer) or 0 (another epoch).
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
  if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
  local now = now_ms()
  for i = 3, #KEYS do
    local o = 2 + (i - 3) * 4
    local ps = tonumber(ARGV[o + 2])
    local _, ends = roll(KEYS[i], ARGV[o + 1], ARGV[o + 2], ARGV[o + 3], now)
    if tonumber(redis.call('HGET', KEYS[i], 'ps')) == ps and redis.call('HGET', KEYS[i], 'pk') == ARGV[o + 1] then
      redis.call('HINCRBY', KEYS[i], 'spent', ARGV[o + 4])
    end
    keep(KEYS[i], true, ends, 0)
  end
  -- Marked once booked: a script stopped by an error before this books again when retried.
  redis.call('SET', KEYS[2], '1', 'PX', 86400000)
  return 1
end

if op == 'seed' then
  -- KEYS: scope.  ARGV: op, period kind, period start, period end, spent.
  -- The ledger's sum for the period. For the same period, what Redis holds already is kept
  -- when it is more (settlements reach Redis before the ledger does); another period, or
  -- another kind of period (the budget changed), takes the ledger's word.
  local h = redis.call('HMGET', KEYS[1], 'pk', 'ps', 'spent')
  if h[1] == ARGV[2] and h[2] == ARGV[3] then
    if tonumber(h[3] or '0') < tonumber(ARGV[5]) then redis.call('HSET', KEYS[1], 'spent', ARGV[5]) end
  else
    redis.call('HSET', KEYS[1], 'pk', ARGV[2], 'ps', ARGV[3], 'pe', ARGV[4], 'spent', ARGV[5])
  end
  keep(KEYS[1], true, tonumber(ARGV[4]), 0)
  return 1
end

return redis.error_reply('unknown operation ' .. tostring(op))
