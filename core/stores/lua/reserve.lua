-- reserve: lazy reclaim, idempotency, the ladder over chain x units x plans, and the holds, in one step.
-- ARGV[3] token, [4] expires_at, [5] idempotency key ('' = none), [6] label, [7] windows,
-- [8] the chain, root first, space-separated, [9] the plans, ';'-separated, each
-- "unit steps unit steps|ppm ppm ..." (ppm per level; empty = no headroom demanded),
-- [10] probe units, space-separated (reported in the accounts, never checked), [11] where the first
-- plan stands in the decision's ladder (an output-cap retry holds the plan after it alone: the
-- record and audit count from it, the reply's index does not), [12] a flag: 1 when this is the
-- client's retry after a lost reply (only then can the token already exist), plus 2 when it asks
-- again after draining a backlog of expired holds (see below).
-- Reply: "kind\ntoken\nplan index\nexpires_at\naccounts\nrejections" with kind 'held', 'denied',
-- 'replay_key' (idempotency key seen) or 'replay_id' (this very id seen: a retry after a lost
-- reply), or 'backlog': not answered while more expired holds wait than one call reclaims and a
-- plan was rejected (see below). Accounts and rejections are '|'-joined fields, 7 per account and 8 per rejection.

local token, expires_at, idem, label, windows_text = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local flag = tonumber(ARGV[12])
local retried, drained = flag % 2 == 1, flag >= 2
local chain = split_words(ARGV[8])
local depth = #chain
local plans = {}
local wanted = {}
-- The usual request, one plan of one unit and no headroom demanded ("unit steps|"), parsed in one match.
local one_unit, one_steps = string.match(ARGV[9], '^([^%s|;]+) (%d+)|$')
if one_unit then
  plans[1] = {{{one_unit, one_steps, one_steps + 0}}, {}, one_unit .. ' ' .. one_steps}
  wanted[one_unit] = true
end
for plan_text in string.gmatch(one_unit and '' or ARGV[9], '[^;]+') do
  local amounts_text, ppm_text = string.match(plan_text, '^([^|]*)|(.*)$')
  local amounts = {}
  for unit, steps in string.gmatch(amounts_text, '(%S+) (%S+)') do
    amounts[#amounts + 1] = {unit, steps, steps + 0}
    wanted[unit] = true
  end
  local ppm = {}
  if ppm_text ~= '' then
    local values = split_words(ppm_text)
    for level = 1, depth do
      ppm[level] = tonumber(values[level])
    end
  end
  plans[#plans + 1] = {amounts, ppm, amounts_text}
end
-- Probes: units reported too (the caller's tool caps); one ending in '*' stands for every unit
-- that starts with the rest ("tool.*": every tool budget on the chain).
local function add_probes(units)
  local prefixes = nil
  for unit in string.gmatch(ARGV[10], '%S+') do
    if string.byte(unit, -1) == 42 then
      prefixes = prefixes or {}
      prefixes[#prefixes + 1] = string.sub(unit, 1, -2)
    else
      units[unit] = true
    end
  end
  if prefixes then
    setmetatable(units, {__index = function(_, unit)
      for _, prefix in ipairs(prefixes) do
        if string.sub(unit, 1, #prefix) == prefix then
          return true
        end
      end
      return nil
    end})
  end
end
if ARGV[10] ~= '' then
  add_probes(wanted)
end

-- A full batch of expired holds reclaimed: more may wait (a crashed fleet's holds, say), and a
-- denial could be theirs. Rather than reclaim them all here (one long script stalls every tenant on
-- this Redis), a denial (or a plan rejected) then answers 'backlog': the client sweeps the tenant batch by batch and
-- asks again (nothing else was written).
local backlog = reclaim() >= BATCH + 0

local function replay(existing, kind, rec)
  local held_units = {}
  for unit in string.gmatch(rec.a, '(%S+) %S+') do
    held_units[unit] = true
  end
  add_probes(held_units)
  -- This very request seen again answers as it first would have: its plan's index in the request
  -- (the record counts from ARGV[11]; a key's replay is matched by the client against its plans).
  local plan = kind == 'replay_id' and ARGV[11] ~= '0' and fmt_int(rec.p - ARGV[11]) or rec.p
  return kind .. '\n' .. existing .. '\n' .. plan .. '\n' .. rec.e .. '\n'
    .. states_text(states(chain, held_units, rec.w), nil) .. '\n'
end

if retried then
  local rec = load(token)
  if rec then
    return replay(token, 'replay_id', rec)
  end
end
if idem ~= '' then
  local existing = redis.call('HGET', K_RES, '!' .. idem)
  local rec = existing and load(existing)
  if rec and not forgotten_now(existing, rec) then  -- past retention, the key is free again
    return replay(existing, 'replay_key', rec)
  end
end

local list, read = states(chain, wanted, windows_text, {'#v'})
local version = read[1] or ''  -- a ledger from before "#v" has none: its holds commit the general way
local by_unit = {}
if one_unit and ARGV[10] == '' then
  by_unit[one_unit] = list  -- states() read only the wanted units: here that one
else
  for _, s in ipairs(list) do
    local bucket = by_unit[s[2]]
    if not bucket then
      bucket = {}
      by_unit[s[2]] = bucket
    end
    bucket[#bucket + 1] = s
  end
end

-- ceil(limit * ppm / 1e6) exactly in doubles: limit = q * 1e6 + r keeps every product below 2^53.
local function required_of(limit, ppm)
  local q = math.floor(limit / 1000000)
  local r = limit - q * 1000000
  if r < 0 then
    q = q - 1
    r = r + 1000000
  elseif r >= 1000000 then
    q = q + 1
    r = r - 1000000
  end
  local x = r * ppm
  local c = math.floor(x / 1000000)
  if x - c * 1000000 > 0 then
    c = c + 1
  end
  return q * ppm + c
end

-- Of several budgets of one unit on one level that do not fit, the tightest is named: least left,
-- then the longest period (its place in PERIODS; lifetime last), as clearance.ledger.choose_plan
-- does, so every store names the same one whatever their order. (No table or closure here: most
-- reserves never compare two.)
local PERIODS = ' minute hour day week month '
local rejections = {}
local chosen, chosen_holds = -1, nil
for p, plan in ipairs(plans) do
  local ppm = plan[2]
  local holds = {}
  local rejected = false  -- the level of the rejection named for this plan: its first level, root
  -- first, that does not fit, whichever unit (at one level, its first unit)
  for _, entry in ipairs(plan[1]) do
    local unit, steps, amount = entry[1], entry[2], entry[3]
    local named = nil  -- {remaining, period, scope} of this unit's rejection named so far
    for _, s in ipairs(by_unit[unit] or {}) do
      if named and s[1] ~= named[3] then
        break  -- the level's budgets of a unit come together: past them
      end
      if rejected and not named and s[8] >= rejected then
        break  -- no shallower than the level already named (budgets come root first)
      end
      local limit = s[5] + 0  -- (arithmetic converts a numeric string for half what tonumber() costs)
      local remaining = limit - s[6] - s[7]
      local code, required = nil, 0
      if remaining < 0 then
        code = 'budget_overage'
      elseif amount > remaining then
        code = 'budget_exhausted'
      else
        local level_ppm = ppm[s[8]]
        if level_ppm and level_ppm > 0 then
          required = required_of(limit, level_ppm)
          if remaining - amount < required then
            code = 'min_headroom'
          end
        end
      end
      if code then
        local tighter = not named or remaining < named[1]
        if not tighter and remaining == named[1] then
          local rank = s[3] == '' and 99 or string.find(PERIODS, ' ' .. s[3] .. ' ', 1, true)
          tighter = rank > (named[2] == '' and 99 or string.find(PERIODS, ' ' .. named[2] .. ' ', 1, true))
        end
        if tighter then
          local text = fmt_int(p - 1) .. '|' .. code .. '|' .. s[1] .. '|' .. unit .. '|' .. s[3]
            .. '|' .. steps .. '|' .. fmt_int(remaining) .. '|' .. fmt_int(required)
          rejections[rejected and #rejections or #rejections + 1] = text  -- replaces this plan's
          named = {remaining, s[3], s[1]}
          rejected = s[8]
        end
      elseif amount > 0 and not rejected then
        holds[#holds + 1] = {s[9], steps, amount}
      end
    end
  end
  if not rejected then
    chosen, chosen_holds = p - 1, holds
    break
  end
end

-- With a backlog, a plan rejected may have been rejected for an expired hold not reached yet: a
-- later plan chosen then is no more an answer than a denial is (the client drains and asks again;
-- a second 'backlog' in a row is taken as a denial). The first plan chosen is an answer, but its
-- headroom would count those expired holds as held: asked again too, unless this is the ask after
-- the drain (new expiries meanwhile, a flood, do not turn a hold that fits into a denial).
if chosen < 0 or (backlog and (#rejections > 0 or not drained)) then
  return (backlog and 'backlog' or 'denied') .. '\n\n-1\n0\n' .. states_text(list, nil) .. '\n' .. table.concat(rejections, '|')
end

-- This id enters the due index here, before anything is held: an id already there is this very
-- request seen again — its first copy, delayed, arriving after the client's retry on a new
-- connection (or the retry after it): answered as a replay, so nothing is held twice. (The usual
-- reserve pays nothing for it: the ZADD was always made, NX only moved it before the writes.)
if redis.call('ZADD', K_DUE, 'NX', expires_at, token) == 0 then
  local rec = load(token)
  if rec then
    return replay(token, 'replay_id', rec)
  end
  redis.call('ZADD', K_DUE, expires_at, token)  -- an entry without a record (none is made so): reset
end

-- The new held counters in one HSET (they were just read: states() carries them), not one HINCRBY each.
-- `held_now` (counter suffix -> the new held, as written) is reused for the reply.
local added, held_now, hold_fields, writes, opened = {}, {}, {}, {}, {}
for i, h in ipairs(chosen_holds) do
  added[h[1]] = h[3]
  hold_fields[i] = h[1] .. ' ' .. h[2]
end
for _, s in ipairs(list) do
  local amount = added[s[9]]
  if amount then
    local value = fmt_int(s[7] + amount)
    held_now[s[9]] = value
    writes[#writes + 1] = s[11]
    writes[#writes + 1] = value
    if s[10] then
      opened[#opened + 1] = s
    end
  end
end
if #writes > 0 then
  hset_pairs(K_LEDGER, writes)
end
if #opened > 0 then
  note_windows(opened)
end
local amounts_text = plans[chosen + 1][3]
local entries = plans[chosen + 1][1]
if #entries > 1 and version ~= '' then
  -- How many holds each unit has, in the order of the amounts (commit's fast path charges each
  -- counter its own unit by them): every budget of a unit held an amount of, none of one held 0.
  local counts = {}
  for k, entry in ipairs(entries) do
    counts[k] = entry[3] > 0 and fmt_int(#(by_unit[entry[1]] or {})) or '0'
  end
  version = version .. '/' .. table.concat(counts, ',')
end
local scope = chain[depth]
local plan = fmt_int(chosen)
local recorded = ARGV[11] == '0' and plan or fmt_int(chosen + ARGV[11])  -- (in the decision's ladder)
local rec = 'held\t' .. recorded .. (version ~= '' and '/' .. version or '') .. '\t' .. NOW .. '\t' .. expires_at
  .. '\t\t' .. scope .. '\t' .. amounts_text .. '\t' .. table.concat(hold_fields, ' ') .. '\t' .. windows_text
  .. '\t\t\t' .. idem .. '\t' .. label  -- see encode()
if idem ~= '' then
  redis.call('HSET', K_RES, token, rec, '!' .. idem, token)
else
  redis.call('HSET', K_RES, token, rec)
end
audit('hold', scope, token, amounts_text, 'plan=' .. recorded)
return 'held\n' .. token .. '\n' .. plan .. '\n' .. expires_at .. '\n' .. states_text(list, held_now) .. '\n'
  .. table.concat(rejections, '|')
