-- Shared prelude of every clearance ledger script (prepended by clearance/stores/redis.py).
--
-- Every script of one tenant receives the same KEYS, all sharing the hash tag {<root>}:
--   KEYS[1] budgets   hash  "<scope>|<unit>|<period>"            -> limit
--   KEYS[2] counters  hash  "s|<scope>|<unit>|<period>|<window>" -> spent
--                           "h|<scope>|<unit>|<period>|<window>" -> held
--   KEYS[3] res       hash  "<token>" -> reservation record (JSON object whose values are all strings)
--   KEYS[4] idem      hash  "<idempotency key>" -> "<token>"
--   KEYS[5] exp       zset  "<token>" scored by expires_at (held reservations only)
--   KEYS[6] forget    zset  "<token>" scored by the time a settled reservation is forgotten
--   KEYS[7] log       stream of audit events, capped with MAXLEN ~
-- and ARGV[1..4] = now, retention, audit cap, reclaim batch.
--
-- Integers never pass through Lua's tostring (Redis 7.0 prints 2e14 as "2e+14"): amounts travel
-- as the decimal strings the client sent, and computed integers are formatted with '%d'.
-- Lua numbers are doubles, exact up to 2^53; clearance.units.MAX_AMOUNT keeps every amount and
-- limit below that.

local K_BUDGETS, K_COUNTERS, K_RES, K_IDEM, K_EXP, K_FORGET, K_LOG = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local NOW = ARGV[1]
local NOW_N = tonumber(NOW)
local RETENTION_N = tonumber(ARGV[2])
local CAP = ARGV[3]
local BATCH = ARGV[4]

local function fmt_int(n)
  return string.format('%d', n)
end

local function fmt_float(x)
  return string.format('%.17g', x)
end

-- Audit entries get explicit stream ids "<server microseconds>-<n>": scripts run one at a time, so
-- on one server the ids of all tenants' streams interleave in true order (the client turns them into
-- AuditEvent.seq = us * 1000 + n). If the server clock stepped back, continue after the stream's top.
local function audit(kind, scope, token, amounts, detail)
  local t = redis.call('TIME')
  local id = t[1] .. string.format('%06d', tonumber(t[2])) .. '-*'
  local ok = redis.pcall('XADD', K_LOG, 'MAXLEN', '~', CAP, id, 'at', NOW, 'k', kind, 's', scope, 'r', token,
    'a', amounts, 'd', detail)
  if type(ok) == 'table' and ok.err then
    local info = redis.call('XINFO', 'STREAM', K_LOG)
    local top = '0-0'
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        top = info[i + 1]
      end
    end
    local us = string.match(top, '^(%d+)-')
    redis.call('XADD', K_LOG, 'MAXLEN', '~', CAP, fmt_int(tonumber(us) + 1) .. '-*', 'at', NOW, 'k', kind,
      's', scope, 'r', token, 'a', amounts, 'd', detail)
  end
end

-- "u1 n1 u2 n2" <-> {u1, n1, u2, n2}
local function split_words(text)
  local out = {}
  if text then
    for word in string.gmatch(text, '%S+') do
      out[#out + 1] = word
    end
  end
  return out
end

-- "period=window;period=window" (lifetime first: "=;minute=...") -> {period = window}
local function parse_windows(text)
  local out = {}
  for period, window in string.gmatch(text, '([^;=]*)=([^;]*)') do
    out[period] = window
  end
  return out
end

-- HMGET in chunks: Lua's unpack() has a stack limit of a few thousand values.
local function hmget(key, fields)
  local out = {}
  for first = 1, #fields, 1000 do
    local last = math.min(first + 999, #fields)
    local part = redis.call('HMGET', key, unpack(fields, first, last))
    for i = 1, last - first + 1 do
      out[first + i - 1] = part[i]
    end
  end
  return out
end

local function load(token)
  local raw = redis.call('HGET', K_RES, token)
  if not raw then
    return nil
  end
  return cjson.decode(raw)
end

local function store(token, rec)
  redis.call('HSET', K_RES, token, cjson.encode(rec))
end

local function unhold(rec)
  local holds = rec.h
  for i = 1, #holds, 2 do
    redis.call('HINCRBY', K_COUNTERS, 'h|' .. holds[i], '-' .. holds[i + 1])
  end
end

local function settle(token, rec, status)
  rec.st = status
  rec.t = NOW
  store(token, rec)
  redis.call('ZREM', K_EXP, token)
  redis.call('ZADD', K_FORGET, fmt_float(NOW_N + RETENTION_N), token)
end

-- Lazy reclaim: return the tenant's expired holds to their budgets (expiry iff expires_at <= now)
-- and forget settled reservations past retention. At most BATCH of each per call.
local function reclaim()
  local expired = 0
  local due = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', NOW, 'LIMIT', 0, BATCH)
  for _, token in ipairs(due) do
    local rec = load(token)
    if rec and rec.st == 'held' then
      unhold(rec)
      settle(token, rec, 'expired')
      audit('expire', rec.s, token, rec.a, '')
      expired = expired + 1
    else
      redis.call('ZREM', K_EXP, token)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', K_FORGET, '-inf', NOW, 'LIMIT', 0, BATCH)
  for _, token in ipairs(old) do
    local rec = load(token)
    if rec then
      if rec.i and redis.call('HGET', K_IDEM, rec.i) == token then
        redis.call('HDEL', K_IDEM, rec.i)
      end
      redis.call('HDEL', K_RES, token)
    end
    redis.call('ZREM', K_FORGET, token)
  end
  return expired, #due, #old
end

local PERIODS = {'', 'minute', 'hour', 'day', 'week', 'month'}

-- The chain of a scope path: "a:1/b:2" -> {"a:1", "a:1/b:2"}
local function chain_of(scope)
  local chain = {}
  local start = 1
  while true do
    local slash = string.find(scope, '/', start, true)
    if not slash then
      chain[#chain + 1] = scope
      return chain
    end
    chain[#chain + 1] = string.sub(scope, 1, slash - 1)
    start = slash + 1
  end
end

-- Current-window states of every budget on `chain` for `units` (chain order, then unit order, then
-- PERIODS order): a list of {scope, unit, period, window, limit_str, spent_str, held_str, level}.
local function states(chain, units, windows)
  local fields = {}
  for _, scope in ipairs(chain) do
    for _, unit in ipairs(units) do
      for _, period in ipairs(PERIODS) do
        fields[#fields + 1] = scope .. '|' .. unit .. '|' .. period
      end
    end
  end
  local out = {}
  if #fields == 0 then
    return out
  end
  local limits = hmget(K_BUDGETS, fields)
  local counter_fields = {}
  local i = 0
  for level, scope in ipairs(chain) do
    for _, unit in ipairs(units) do
      for _, period in ipairs(PERIODS) do
        i = i + 1
        local limit = limits[i]
        if limit then
          local suffix = scope .. '|' .. unit .. '|' .. period .. '|' .. windows[period]
          out[#out + 1] = {scope, unit, period, windows[period], limit, '0', '0', level, suffix}
          counter_fields[#counter_fields + 1] = 's|' .. suffix
          counter_fields[#counter_fields + 1] = 'h|' .. suffix
        end
      end
    end
  end
  if #out > 0 then
    local counters = hmget(K_COUNTERS, counter_fields)
    for j, state in ipairs(out) do
      state[6] = counters[2 * j - 1] or '0'
      state[7] = counters[2 * j] or '0'
    end
  end
  return out
end

-- Append states to a flat reply: n, then 7 strings each.
local function push_states(reply, list, extra_held)
  reply[#reply + 1] = fmt_int(#list)
  for _, s in ipairs(list) do
    reply[#reply + 1] = s[1]
    reply[#reply + 1] = s[2]
    reply[#reply + 1] = s[3]
    reply[#reply + 1] = s[4]
    reply[#reply + 1] = s[5]
    reply[#reply + 1] = s[6]
    local add = extra_held and extra_held[s[9]]
    if add then
      reply[#reply + 1] = fmt_int(tonumber(s[7]) + add)
    else
      reply[#reply + 1] = s[7]
    end
  end
end
