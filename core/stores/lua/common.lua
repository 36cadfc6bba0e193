-- Shared prelude of every clearance ledger script (prepended by clearance/stores/redis.py).
--
-- Every script of one tenant receives the same KEYS, all sharing the hash tag {<root>}:
--   KEYS[1] ledger  hash   "@<scope>"                            -> "unit|period|limit unit|period|limit ..."
--                          "s|<scope>|<unit>|<period>|<window>"  -> spent
--                          "h|<scope>|<unit>|<period>|<window>"  -> held
--   KEYS[2] res     hash   "<token>" -> reservation record (JSON object whose values are all strings)
--                          "!<idempotency key>" -> "<token>"
--   KEYS[3] due     zset   "<token>" scored by when it next needs attention: expires_at while held,
--                          then the time a settled reservation is forgotten (one index, one lookup)
--   KEYS[4] held    zset   "<token>" by created_at, held reservations only: listings of live holds
--                          read it instead of every reservation remembered
--   KEYS[5] log     stream audit events, capped with MAXLEN ~
-- ARGV[1] = now, ARGV[2] = "<retention> <audit cap> <reclaim batch>".
--
-- Integers never pass through Lua's tostring (Redis 7.0 prints 2e14 as "2e+14"): amounts travel
-- as the decimal strings the client sent, and computed integers are formatted with '%d'.
-- Lua numbers are doubles, exact up to 2^53; clearance.units.MAX_AMOUNT keeps every amount and
-- limit below that. Scope paths, units, periods and windows never contain ' ', '|', ';' or '='.

local K_LEDGER, K_RES, K_DUE, K_HELD, K_LOG = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local NOW = ARGV[1]
local NOW_N = tonumber(NOW)
local RETENTION, CAP, BATCH = string.match(ARGV[2], '^(%S+) (%S+) (%S+)$')
local RETENTION_N = tonumber(RETENTION)

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

-- "u1 n1 u2 n2" -> {u1, n1, u2, n2}
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
    redis.call('HINCRBY', K_LEDGER, 'h|' .. holds[i], '-' .. holds[i + 1])
  end
end

local function settle(token, rec, status)
  rec.st = status
  rec.t = NOW
  store(token, rec)
  redis.call('ZADD', K_DUE, fmt_float(NOW_N + RETENTION_N), token)
  redis.call('ZREM', K_HELD, token)
end

local function expire(token, rec)
  unhold(rec)
  settle(token, rec, 'expired')
  audit('expire', rec.s, token, rec.a, '')
end

-- One reservation, expired first if its time has come (expiry iff expires_at <= now): enough for
-- commit, release and extend, which touch only that reservation's accounts.
local function load_current(token)
  local rec = load(token)
  if rec and rec.st == 'held' and tonumber(rec.e) <= NOW_N then
    expire(token, rec)
  end
  return rec
end

-- Lazy reclaim: return the tenant's expired holds to their budgets and drop settled reservations
-- past retention, oldest first, at most BATCH per call. Returns expired, seen, forgotten.
local function reclaim()
  local expired, forgotten = 0, 0
  local due = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', NOW, 'LIMIT', 0, BATCH)
  for _, token in ipairs(due) do
    local rec = load(token)
    if rec and rec.st == 'held' then
      expire(token, rec)
      expired = expired + 1
    else
      if rec then
        if rec.i and redis.call('HGET', K_RES, '!' .. rec.i) == token then
          redis.call('HDEL', K_RES, '!' .. rec.i)
        end
        redis.call('HDEL', K_RES, token)
        forgotten = forgotten + 1
      end
      redis.call('ZREM', K_DUE, token)
    end
  end
  return expired, #due, forgotten
end

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

-- Budgets on `chain` (of units in `wanted`, a set, or all when nil) with the counters of their window
-- in `windows_text`, in chain order then each level's budget order: a list of
-- {scope, unit, period, window, limit, spent, held, level, counter suffix}, numbers as strings.
local function states(chain, wanted, windows_text)
  local windows = nil  -- parsed only when a period budget shows up: lifetime budgets need no window
  local index_fields = {}
  for i, scope in ipairs(chain) do
    index_fields[i] = '@' .. scope
  end
  local index = redis.call('HMGET', K_LEDGER, unpack(index_fields))
  local out, fields = {}, {}
  for level, scope in ipairs(chain) do
    local entries = index[level]
    if entries then
      for unit, period, limit in string.gmatch(entries, '([^ |]+)|([^ |]*)|([^ ]+)') do
        if wanted == nil or wanted[unit] then
          local window = ''
          if period ~= '' then
            windows = windows or parse_windows(windows_text)
            window = windows[period]
          end
          local suffix = scope .. '|' .. unit .. '|' .. period .. '|' .. window
          out[#out + 1] = {scope, unit, period, window, limit, '0', '0', level, suffix}
          fields[#fields + 1] = 's|' .. suffix
          fields[#fields + 1] = 'h|' .. suffix
        end
      end
    end
  end
  if #fields > 0 then
    local counters = hmget(K_LEDGER, fields)
    for j, s in ipairs(out) do
      s[6] = counters[2 * j - 1] or '0'
      s[7] = counters[2 * j] or '0'
    end
  end
  return out
end

-- States as one string "scope|unit|period|window|limit|spent|held|scope|..." (one reply element
-- instead of seven per budget), `extra_held` added to the held of the suffixes it names.
local function states_text(list, extra_held)
  local parts = {}
  for _, s in ipairs(list) do
    local held = s[7]
    local add = extra_held and extra_held[s[9]]
    if add then
      held = fmt_int(tonumber(held) + add)
    end
    parts[#parts + 1] = s[1] .. '|' .. s[2] .. '|' .. s[3] .. '|' .. s[4] .. '|' .. s[5] .. '|' .. s[6] .. '|' .. held
  end
  return table.concat(parts, '|')
end
