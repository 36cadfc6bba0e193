-- commit: settle the actual amounts and free the rest of the hold, in one step.
-- ARGV[3] token, [4] actual ("unit steps ..."; "-" = the held amounts; held units it omits are added
-- at their held amounts), [5] '1' on the client's retry after a lost reply. Reply: "notfound" or
-- "status\ncharged\nflags\nreplayed ('1'/'0')".
-- Reality wins: a commit after expiry or release is recorded (flagged late / after_release), against
-- the budgets on the chain now, in the windows the reservation was made in.

local token, actual_arg = ARGV[3], ARGV[4]
local rec = load_current(token)
if not rec then
  return 'notfound'
end
local prior = rec.st

-- The usual commit: one unit held and the same one unit charged (or "-"): no tables needed.
local held_unit, held_text = string.match(rec.a, '^(%S+) (%S+)$')
local actual_text = actual_arg
local single = false
if actual_arg == '-' then
  actual_text = rec.a
  single = held_unit ~= nil
elseif held_unit and string.match(actual_arg, '^(%S+) %S+$') == held_unit then
  single = true
else
  local named = {}
  for unit in string.gmatch(actual_arg, '(%S+) %S+') do
    named[unit] = true
  end
  local missing = {}
  for unit, steps in string.gmatch(rec.a, '(%S+) (%S+)') do
    if not named[unit] then
      missing[#missing + 1] = unit .. ' ' .. steps
    end
  end
  if #missing > 0 then
    local tail = table.concat(missing, ' ')
    actual_text = actual_text == '' and tail or actual_text .. ' ' .. tail
  end
end

if prior == 'committed' then
  -- Already committed. The client's retry after a lost reply that finds its own amounts there is
  -- answered as its first run would have been (not replayed): for the caller it is the first answer.
  local own = ARGV[5] == '1' and rec.ca == actual_text
  return 'committed\n' .. rec.ca .. '\n' .. rec.f .. '\n' .. (own and '0' or '1')
end

local flags = {}
if prior == 'expired' then
  flags[#flags + 1] = 'late'
elseif prior == 'released' then
  flags[#flags + 1] = 'after_release'
end
local charge = {}
local over_hold, charging = false, false
local held_by_unit = nil  -- unit -> held amount (several units held)
if single then
  local n = string.match(actual_text, ' (%S+)$') + 0
  over_hold = n > held_text + 0
  if n > 0 then
    charge[held_unit] = n
    charging = true
  end
else
  held_by_unit = {}
  for unit, steps in string.gmatch(rec.a, '(%S+) (%S+)') do
    held_by_unit[unit] = steps + 0
  end
  for unit, steps in string.gmatch(actual_text, '(%S+) (%S+)') do
    local n = steps + 0
    if n > (held_by_unit[unit] or 0) then
      over_hold = true
    end
    if n > 0 then
      charge[unit] = n
      charging = true
    end
  end
end
if over_hold then
  flags[#flags + 1] = 'over_hold'
end

-- Counter changes are written with one HSET at the end (pairs_out, below). The held counters of a
-- live hold are read in the same HMGET as the chain's budget index (or its counters, fast path).
local hold_fields, hold_steps, hold_suffixes, hold_ids = {}, {}, {}, {}
if prior == 'held' then
  for suffix, id, steps in string.gmatch(rec.h, '((%d+)|%S*) (%S+)') do
    local i = #hold_fields + 1
    hold_fields[i] = 'h' .. suffix
    hold_steps[i] = steps + 0
    hold_suffixes[i] = suffix
    hold_ids[i] = id
  end
end
local over = false
local list, current
-- The counters to write, as HSET field/value pairs. A spent counter past 2^53 (overage is recorded,
-- never dropped, so spent can pass any limit) is no longer exact as a Lua number: it is incremented
-- by Redis itself (int64) instead of written.
local pairs_out = {}
local function charge_spent(field, spent, steps)
  if spent > 9007199254740991 then
    redis.call('HINCRBY', K_LEDGER, field, fmt_int(steps))
  else
    pairs_out[#pairs_out + 1] = field
    pairs_out[#pairs_out + 1] = fmt_int(spent)
  end
end

-- Fast path, the usual commit: a live hold charged only in units it held (a one-unit hold, or a
-- model call's usd and tokens), on a chain where no budget was created or removed since the hold
-- ("#v" as the record has it). Reserve held every budget of a unit it held an amount of, so the
-- hold's own counters are exactly the budgets to charge: one HMGET of their counters and limits
-- instead of reading and parsing the chain's budget index level by level (the general path below,
-- which is what a version mismatch falls back to). A hold of several units records how many of its
-- holds belong to each unit, in the order of its amounts ("<version>/<n>,<n>,..."), so each counter
-- is charged its own unit; a record without them (one unit, or written before) needs none / goes
-- the general way.
local fast = false
local version, per_unit = string.match(rec.v, '^([^/]*)/?(.*)$')
if charging and #hold_fields > 0 and version ~= '' then
  local steps = single and charge[held_unit]
  local steps_of = nil  -- several units: the steps each hold's counter is charged
  if not steps and held_by_unit and per_unit ~= '' then
    steps_of = {}
    for unit in pairs(charge) do
      if not ((held_by_unit[unit] or 0) > 0) then
        steps_of = nil  -- charged in a unit it held nothing of: its budgets were never held
        break
      end
    end
    if steps_of then
      local counts = string.gmatch(per_unit, '%d+')
      local i = 0
      for unit in string.gmatch(rec.a, '(%S+) %S+') do
        local n = counts() + 0
        local unit_steps = charge[unit] or 0
        for _ = 1, n do
          i = i + 1
          steps_of[i] = unit_steps
        end
      end
      if i ~= #hold_fields then
        steps_of = nil
      end
    end
  end
  if steps or steps_of then
    local fields = {'#v'}
    for i, field in ipairs(hold_fields) do
      fields[3 * i - 1] = field
      fields[3 * i] = 's' .. hold_suffixes[i]
      fields[3 * i + 1] = 'l' .. hold_ids[i]
    end
    local got = hmget(K_LEDGER, fields)
    if got[1] == version then
      fast = true
      for i = 1, #hold_fields do
        if not got[3 * i + 1] then  -- a budget set before "l<id>" was kept: the general way
          fast = false
          break
        end
      end
    end
    if fast then
      for i = 1, #hold_fields do
        local held_now = (got[3 * i - 1] or 0) - hold_steps[i]
        pairs_out[#pairs_out + 1] = hold_fields[i]
        pairs_out[#pairs_out + 1] = fmt_int(held_now)
        local counter_steps = steps or steps_of[i]
        if counter_steps > 0 then
          local spent = (got[3 * i] or 0) + counter_steps
          charge_spent(fields[3 * i], spent, counter_steps)
          if spent + held_now > got[3 * i + 1] + 0 then
            over = over or {}
            over[#over + 1] = {fields[3 * i], hold_fields[i], got[3 * i + 1]}
          end
        end
      end
    end
  end
end

if not fast then
  local writes = {}  -- field -> new value
  local charged = {}  -- spent field -> the steps this commit adds to it
  if charging then
    list, current = states(chain_of(rec.s), charge, rec.w, hold_fields)
  elseif #hold_fields > 0 then
    list, current = {}, hmget(K_LEDGER, hold_fields)
  end
  for i = 1, #hold_fields do
    writes[hold_fields[i]] = (current[i] or 0) - hold_steps[i]
  end
  if list then
    for _, s in ipairs(list) do
      local spent = s[6] + charge[s[2]]
      local held_now = writes[s[11]] or s[7] + 0
      writes['s' .. s[9]] = spent
      charged['s' .. s[9]] = charge[s[2]]
      if spent + held_now > s[5] + 0 then
        over = over or {}
        over[#over + 1] = {'s' .. s[9], s[11], s[5]}
      end
    end
  end
  for field, value in pairs(writes) do
    local steps = charged[field]
    if steps then
      charge_spent(field, value, steps)
    else
      pairs_out[#pairs_out + 1] = field
      pairs_out[#pairs_out + 1] = fmt_int(value)
    end
  end
end
if #pairs_out > 0 then
  hset_pairs(K_LEDGER, pairs_out)
end
if list then
  note_windows(list)
end
-- Expired holds return to their budgets on any call touching them: one still counted here would
-- flag an overage that is none (the memory store reclaims before it charges). So a commit that looks
-- over reclaims the tenant's expired holds, a batch at a time (expired holds come first), looking
-- again after each, until it fits or none is left — unless this worker's clock is off (reclaim
-- refuses it; a commit never is): the usual commit never pays for it. `over` lists {spent field,
-- held field, limit} of the counters past their limit.
if over and clock_ok() then
  local counters = over
  local fields = {}
  for i, c in ipairs(counters) do
    fields[2 * i - 1] = c[1]
    fields[2 * i] = c[2]
  end
  while over and reclaim() > 0 do
    local got = hmget(K_LEDGER, fields)
    over = false
    for i, c in ipairs(counters) do
      if (got[2 * i - 1] or 0) + (got[2 * i] or 0) > c[3] + 0 then
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
return 'committed\n' .. actual_text .. '\n' .. flags_text .. '\n0'
