-- The other operations, chosen by ARGV[1]; each is a few lines, so they share one script.
local op = ARGV[1]

if op == 'settle' then
  -- KEYS: leases, lease, scope...
  -- ARGV: op, lease id, cost, booked at (ms), input reserved, input used, output reserved,
  --       output used, then per scope: budgeted (1/0), input tpm, output tpm (-1: none).
  local record = redis.call('GET', KEYS[2])
  if record then
    -- Still held: give back the reservation and the slot (an expired lease gave them back).
    give_back(record)
    redis.call('DEL', KEYS[2])
    redis.call('ZREM', KEYS[1], ARGV[2])
  end
  local cost, at = ARGV[3], tonumber(ARGV[4])
  local in_res, in_used = tonumber(ARGV[5]), tonumber(ARGV[6])
  local out_res, out_used = tonumber(ARGV[7]), tonumber(ARGV[8])
  for i = 3, #KEYS do
    local key = KEYS[i]
    local o = 8 + (i - 3) * 3
    if ARGV[o + 1] == '1' then
      -- The cost counts in the period that contains its booking time, as in the ledger.
      local h = redis.call('HMGET', key, 'ps', 'pe')
      local ps, pe = tonumber(h[1]), tonumber(h[2])
      if ps and at >= ps and at < pe then redis.call('HINCRBY', key, 'spent', cost) end
    end
    local itpm, otpm = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
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
  -- KEYS: leases, lease, scope.  ARGV: op, now, lease expiry, lease id, concurrency, scope TTL.
  purge(KEYS[1], tonumber(ARGV[2]))
  local conc = tonumber(ARGV[5])
  if conc >= 0 and tonumber(redis.call('HGET', KEYS[3], 'inf') or '0') >= conc then
    return 0
  end
  redis.call('HINCRBY', KEYS[3], 'inf', 1)
  if redis.call('PTTL', KEYS[3]) >= 0 then redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6])) end
  redis.call('SET', KEYS[2], cjson.encode({w = '0', s = {{k = KEYS[3], b = 0, c = 1}}}))
  redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[4])
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

if op == 'seed' then
  -- KEYS: scope.  ARGV: op, period start, period end, spent.
  -- The ledger's sum for the period; what Redis holds already is kept when it is more
  -- (settlements reach Redis before the ledger does).
  local stored = tonumber(redis.call('HGET', KEYS[1], 'ps'))
  local ps = tonumber(ARGV[2])
  if stored == nil or stored < ps then
    redis.call('HSET', KEYS[1], 'ps', ARGV[2], 'pe', ARGV[3], 'spent', ARGV[4])
  elseif stored == ps and tonumber(redis.call('HGET', KEYS[1], 'spent') or '0') < tonumber(ARGV[4]) then
    redis.call('HSET', KEYS[1], 'spent', ARGV[4])
  end
  local pe = tonumber(ARGV[3])
  if pe < 9e15 then redis.call('PEXPIREAT', KEYS[1], pe + 86400000) end
  return 1
end

return redis.error_reply('unknown operation ' .. tostring(op))
