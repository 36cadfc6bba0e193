-- reserve: lazy reclaim, idempotency, the ladder over chain x units x plans, and the holds, in one step.
-- ARGV[5] token, [6] expires_at, [7] idempotency key ('' = none), [8] label, [9] windows,
-- [10] n levels, then the chain (root first), then n plans, each: n units, (unit, steps)..., ppm per level,
-- then n probes and the probe units (reported in the accounts, never checked).
-- Reply: {kind, token, plan index, expires_at, n accounts, account fields..., n rejections, rejection fields...}
-- with kind 'held', 'denied', 'replay_key' (idempotency key seen) or 'replay_id' (this very id seen:
-- a retry after a lost reply).

local token, expires_at, idem, label, windows_text = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local depth = tonumber(ARGV[10])
local chain = {}
for i = 1, depth do
  chain[i] = ARGV[10 + i]
end
local pos = 11 + depth
local n_plans = tonumber(ARGV[pos])
pos = pos + 1
local plans = {}
local units, seen_unit = {}, {}
for p = 1, n_plans do
  local n_units = tonumber(ARGV[pos])
  pos = pos + 1
  local amounts = {}
  for _ = 1, n_units do
    local unit, steps = ARGV[pos], ARGV[pos + 1]
    amounts[#amounts + 1] = {unit, steps, tonumber(steps)}
    if not seen_unit[unit] then
      seen_unit[unit] = true
      units[#units + 1] = unit
    end
    pos = pos + 2
  end
  local ppm = {}
  for level = 1, depth do
    ppm[level] = tonumber(ARGV[pos])
    pos = pos + 1
  end
  plans[p] = {amounts, ppm}
end
local n_probes = tonumber(ARGV[pos])
for i = 1, n_probes do
  local unit = ARGV[pos + i]
  if not seen_unit[unit] then
    seen_unit[unit] = true
    units[#units + 1] = unit
  end
end

reclaim()

local function replay(existing, kind)
  local rec = load(existing)
  local held_units = split_words(rec.a)
  local rec_units = {}
  for i = 1, #held_units, 2 do
    rec_units[#rec_units + 1] = held_units[i]
  end
  local reply = {kind, existing, rec.p, rec.e}
  push_states(reply, states(chain, rec_units, parse_windows(rec.w)), nil)
  reply[#reply + 1] = '0'
  return reply
end

if redis.call('HEXISTS', K_RES, token) == 1 then
  return replay(token, 'replay_id')
end
if idem ~= '' then
  local existing = redis.call('HGET', K_IDEM, idem)
  if existing and redis.call('HEXISTS', K_RES, existing) == 1 then
    return replay(existing, 'replay_key')
  end
end

local windows = parse_windows(windows_text)
local list = states(chain, units, windows)
local by_unit = {}
for _, s in ipairs(list) do
  local bucket = by_unit[s[2]]
  if not bucket then
    bucket = {}
    by_unit[s[2]] = bucket
  end
  bucket[#bucket + 1] = s
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

local rejections = {}
local chosen, chosen_holds = -1, nil
for p = 1, n_plans do
  local amounts, ppm = plans[p][1], plans[p][2]
  local holds = {}
  local rejected = false
  for _, entry in ipairs(amounts) do
    local unit, steps, amount = entry[1], entry[2], entry[3]
    for _, s in ipairs(by_unit[unit] or {}) do
      local limit = tonumber(s[5])
      local remaining = limit - tonumber(s[6]) - tonumber(s[7])
      local code, required = nil, 0
      if remaining < 0 then
        code = 'budget_overage'
      elseif amount > remaining then
        code = 'budget_exhausted'
      else
        local level_ppm = ppm[s[8]]
        if level_ppm > 0 then
          required = required_of(limit, level_ppm)
          if remaining - amount < required then
            code = 'min_headroom'
          end
        end
      end
      if code then
        local r = rejections
        r[#r + 1] = fmt_int(p - 1)
        r[#r + 1] = code
        r[#r + 1] = s[1]
        r[#r + 1] = unit
        r[#r + 1] = s[3]
        r[#r + 1] = steps
        r[#r + 1] = fmt_int(remaining)
        r[#r + 1] = fmt_int(required)
        rejected = true
        break
      end
      if amount > 0 then
        holds[#holds + 1] = {s[9], steps, amount}
      end
    end
    if rejected then
      break
    end
  end
  if not rejected then
    chosen, chosen_holds = p - 1, holds
    break
  end
end

local function push_rejections(reply)
  reply[#reply + 1] = fmt_int(#rejections / 8)
  for _, v in ipairs(rejections) do
    reply[#reply + 1] = v
  end
  return reply
end

if chosen < 0 then
  local reply = {'denied', '', '-1', '0'}
  push_states(reply, list, nil)
  return push_rejections(reply)
end

local added, hold_fields = {}, {}
for _, h in ipairs(chosen_holds) do
  redis.call('HINCRBY', K_COUNTERS, 'h|' .. h[1], h[2])
  added[h[1]] = h[3]
  hold_fields[#hold_fields + 1] = h[1]
  hold_fields[#hold_fields + 1] = h[2]
end
local plan_amounts = {}
for _, entry in ipairs(plans[chosen + 1][1]) do
  plan_amounts[#plan_amounts + 1] = entry[1]
  plan_amounts[#plan_amounts + 1] = entry[2]
end
local amounts_text = table.concat(plan_amounts, ' ')
local scope = chain[depth]
local rec = {s = scope, st = 'held', p = fmt_int(chosen), a = amounts_text, h = hold_fields, w = windows_text,
  c = NOW, e = expires_at, f = '', l = label}
if idem ~= '' then
  rec.i = idem
  redis.call('HSET', K_IDEM, idem, token)
end
store(token, rec)
redis.call('ZADD', K_EXP, expires_at, token)
audit('hold', scope, token, amounts_text, 'plan=' .. fmt_int(chosen))

local reply = {'held', token, fmt_int(chosen), expires_at}
push_states(reply, list, added)
return push_rejections(reply)
