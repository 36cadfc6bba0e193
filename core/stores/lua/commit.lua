-- commit: settle the actual amounts and free the rest of the hold, in one step.
-- ARGV[5] token, [6] actual ("unit steps ..."; "-" = the held amounts; held units it omits are added).
-- Reply: {'notfound'} or {status, charged, flags, replayed '1'/'0'}.
-- Reality wins: a commit after expiry or release is recorded (flagged late / after_release), against
-- the budgets on the chain now, in the windows the reservation was made in.

local token, actual_arg = ARGV[5], ARGV[6]
reclaim()
local rec = load(token)
if not rec then
  return {'notfound'}
end
if rec.st == 'committed' then
  return {'committed', rec.ca or '', rec.f or '', '1'}
end
local prior = rec.st
-- A unit the reservation held but the actual does not name is settled at its held amount.
local actual_text = actual_arg
if actual_arg == '-' then
  actual_text = rec.a
else
  local named = {}
  local given = split_words(actual_arg)
  for i = 1, #given, 2 do
    named[given[i]] = true
  end
  local missing = {}
  local held = split_words(rec.a)
  for i = 1, #held, 2 do
    if not named[held[i]] then
      missing[#missing + 1] = held[i]
      missing[#missing + 1] = held[i + 1]
    end
  end
  if #missing > 0 then
    if actual_text == '' then
      actual_text = table.concat(missing, ' ')
    else
      actual_text = actual_text .. ' ' .. table.concat(missing, ' ')
    end
  end
end
if prior == 'held' then
  unhold(rec)
end

local flags = {}
if prior == 'expired' then
  flags[#flags + 1] = 'late'
elseif prior == 'released' then
  flags[#flags + 1] = 'after_release'
end
local held_words = split_words(rec.a)
local held_by_unit = {}
for i = 1, #held_words, 2 do
  held_by_unit[held_words[i]] = tonumber(held_words[i + 1])
end
local actual = split_words(actual_text)
local over_hold = false
for i = 1, #actual, 2 do
  if tonumber(actual[i + 1]) > (held_by_unit[actual[i]] or 0) then
    over_hold = true
  end
end
if over_hold then
  flags[#flags + 1] = 'over_hold'
end

local chain = chain_of(rec.s)
local windows = parse_windows(rec.w)
local charge_units, charge_steps = {}, {}
for i = 1, #actual, 2 do
  if tonumber(actual[i + 1]) > 0 then
    charge_units[#charge_units + 1] = actual[i]
    charge_steps[actual[i]] = actual[i + 1]
  end
end
local over = false
if #charge_units > 0 then
  local fields, meta = {}, {}
  for _, scope in ipairs(chain) do
    for _, unit in ipairs(charge_units) do
      for _, period in ipairs(PERIODS) do
        fields[#fields + 1] = scope .. '|' .. unit .. '|' .. period
        meta[#meta + 1] = {scope, unit, period}
      end
    end
  end
  local limits = hmget(K_BUDGETS, fields)
  for i, m in ipairs(meta) do
    local limit = limits[i]
    if limit then
      local suffix = m[1] .. '|' .. m[2] .. '|' .. m[3] .. '|' .. windows[m[3]]
      local spent = redis.call('HINCRBY', K_COUNTERS, 's|' .. suffix, charge_steps[m[2]])
      local held = tonumber(redis.call('HGET', K_COUNTERS, 'h|' .. suffix) or '0')
      if spent + held > tonumber(limit) then
        over = true
      end
    end
  end
end
if over then
  flags[#flags + 1] = 'overage'
end
local flags_text = table.concat(flags, ',')
rec.ca = actual_text
rec.f = flags_text
settle(token, rec, 'committed')
audit('commit', rec.s, token, actual_text, flags_text)
return {'committed', actual_text, flags_text, '0'}
