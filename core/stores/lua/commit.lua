-- commit: settle the actual amounts and free the rest of the hold, in one step.
-- ARGV[3] token, [4] actual ("unit steps ..."; "-" = the held amounts; held units it omits are added
-- at their held amounts). Reply: {'notfound'} or {status, charged, flags, replayed '1'/'0'}.
-- Reality wins: a commit after expiry or release is recorded (flagged late / after_release), against
-- the budgets on the chain now, in the windows the reservation was made in.

local token, actual_arg = ARGV[3], ARGV[4]
local rec = load_current(token)
if not rec then
  return {'notfound'}
end
if rec.st == 'committed' then
  return {'committed', rec.ca or '', rec.f or '', '1'}
end
local prior = rec.st

local held = split_words(rec.a)
local held_by_unit = {}
for i = 1, #held, 2 do
  held_by_unit[held[i]] = tonumber(held[i + 1])
end
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
  for i = 1, #held, 2 do
    if not named[held[i]] then
      missing[#missing + 1] = held[i]
      missing[#missing + 1] = held[i + 1]
    end
  end
  if #missing > 0 then
    local tail = table.concat(missing, ' ')
    actual_text = actual_text == '' and tail or actual_text .. ' ' .. tail
  end
end
-- Counter changes are gathered in `writes` (field -> new value) and written with one HSET at the end:
-- one read of the held counters and one write, instead of one HINCRBY per hold and per charge.
local writes = {}
if prior == 'held' then
  local holds = rec.h
  local fields = {}
  for i = 1, #holds, 2 do
    fields[#fields + 1] = 'h|' .. holds[i]
  end
  if #fields > 0 then
    local current = hmget(K_LEDGER, fields)
    for i = 1, #fields do
      writes[fields[i]] = tonumber(current[i] or '0') - tonumber(holds[2 * i])
    end
  end
end

local flags = {}
if prior == 'expired' then
  flags[#flags + 1] = 'late'
elseif prior == 'released' then
  flags[#flags + 1] = 'after_release'
end
local actual = split_words(actual_text)
local charge = {}
local over_hold = false
for i = 1, #actual, 2 do
  local steps = tonumber(actual[i + 1])
  if steps > (held_by_unit[actual[i]] or 0) then
    over_hold = true
  end
  if steps > 0 then
    charge[actual[i]] = actual[i + 1]
  end
end
if over_hold then
  flags[#flags + 1] = 'over_hold'
end

local over = false
if next(charge) then
  for _, s in ipairs(states(chain_of(rec.s), charge, rec.w)) do
    local spent = tonumber(s[6]) + tonumber(charge[s[2]])
    local held_now = writes['h|' .. s[9]] or tonumber(s[7])
    writes['s|' .. s[9]] = spent
    if spent + held_now > tonumber(s[5]) then
      over = true
    end
  end
end
local pairs_out = {}
for field, value in pairs(writes) do
  pairs_out[#pairs_out + 1] = field
  pairs_out[#pairs_out + 1] = fmt_int(value)
end
if #pairs_out > 0 then
  redis.call('HSET', K_LEDGER, unpack(pairs_out))
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
