-- Shared prelude of every clearance ledger script (prepended by clearance/stores/redis.py).
--
-- Every script of one tenant receives the same KEYS, all sharing the hash tag {<root>}:
--   KEYS[1] ledger  hash   "@<scope>"                 -> "unit|period|limit|id unit|period|limit|id ..."
--                          "s<id>|<window>"           -> spent
--                          "h<id>|<window>"           -> held
--                          "#next"                    -> the last budget id given out in this tenant
--                          "=<scope>|<unit>|<period>" -> "<id>" (kept a retention after the budget is
--                                                        removed: set again by then, it continues its
--                                                        counters; see remove_budget.lua)
--                          "#<id>"                    -> "<scope>|<unit>|<period>" (records name ids)
--                          "l<id>"                    -> the budget's limit (also in its "@<scope>" entry)
--                          "#v"                       -> the budgets version: +1 whenever a budget is
--                                                        created or removed (see commit's fast path)
--                          "w<id>"                    -> "window@t ..." a period budget's windows with
--                                                        counters (see note_windows)
--   Counters are named by a short per-tenant budget id, not the scope path: their names cost the same
--   to build, read and write at any depth. (Layout of 0.1: counters named "s|<scope>|<unit>|<period>|
--   <window>" and budgets without an id are refused, never silently skipped: see refuse_old.)
--   KEYS[2] res     hash   "<token>" -> reservation record (tab-separated, see encode below)
--                          "!<idempotency key>" -> "<token>"
--   KEYS[3] due     zset   "<token>" scored by when it next needs attention: expires_at while held
--                          (> 0), then minus the time a settled reservation is forgotten (< 0). One
--                          range [-now, now] finds all that is due; (0, +inf) lists the live holds.
--                          (A ledger of 0.1 scored settled ones by +forget time: they are found as
--                          due all the same, and listings of holds skip them by their status.)
--   KEYS[4] log     stream audit events, capped with MAXLEN ~
-- ARGV[1] = now (the worker's clock), ARGV[2] = "<retention> <audit cap> <reclaim batch> <max clock skew>".
-- Replies are one string, fields joined by '\n' (one bulk string parses faster than an array).
--
-- Integers never pass through Lua's tostring (Redis 7.0 prints 2e14 as "2e+14"): amounts travel
-- as the decimal strings the client sent, and computed integers are formatted with '%d'.
-- Lua numbers are doubles, exact up to 2^53; clearance.units.MAX_AMOUNT keeps every amount and
-- limit below that. Scope paths, units, periods and windows never contain ' ', '|', ';', '=', tab
-- or newline.

local K_LEDGER, K_RES, K_DUE, K_LOG = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local NOW = ARGV[1]
local NOW_N = tonumber(NOW)
local RETENTION, CAP, BATCH, MAX_SKEW, FIRST = string.match(ARGV[2], '^(%S+) (%S+) (%S+) (%S+) ?(%S*)$')

-- A process's first call on a tenant (ARGV[2] ends in ' 1') first checks that the Redis user may run
-- every command these scripts use, on these keys. Redis does not undo a script's writes when a later
-- command is refused, and the audit (XADD, TIME) comes last: a user lacking one permission would have
-- a denied reserve's hold written all the same, or a commit that raised without its audit event.
-- (Once per tenant and process: a user's permissions narrowed while workers run reach only their
-- new tenants, until they restart. Redis before 7.0 has no acl_check_cmd: nothing is checked.)
if FIRST == '1' and redis.acl_check_cmd then
  local needed = {
    {'HGET', K_LEDGER, 'f'}, {'HMGET', K_LEDGER, 'f'}, {'HGETALL', K_LEDGER}, {'HSET', K_LEDGER, 'f', 'v'},
    {'HINCRBY', K_LEDGER, 'f', '1'}, {'HDEL', K_LEDGER, 'f'},
    {'HGET', K_RES, 'f'}, {'HSET', K_RES, 'f', 'v'}, {'HDEL', K_RES, 'f'},
    {'ZSCORE', K_DUE, 'm'}, {'ZRANGE', K_DUE, '0', '-1'}, {'ZRANGEBYSCORE', K_DUE, '0', '1'},
    {'ZREVRANGEBYSCORE', K_DUE, '1', '0'}, {'ZADD', K_DUE, '1', 'm'}, {'ZREM', K_DUE, 'm'},
    {'XADD', K_LOG, '*', 'f', 'v'}, {'XINFO', 'STREAM', K_LOG}, {'TIME'},
  }
  for _, command in ipairs(needed) do
    if not redis.acl_check_cmd(unpack(command)) then
      local key = command[1] == 'XINFO' and command[3] or command[2]
      error({err = 'NOPERM clearance: this Redis user may not run ' .. command[1] .. (key and ' on ' .. key or '')
        .. ' (nothing was written; see the ACL line in docs/redis.md)'})
    end
  end
end

-- The server's clock, read at most once per script (audit ids, window pruning, the skew check).
local server_time = nil
local function server_clock()
  if not server_time then
    server_time = redis.call('TIME')
  end
  return server_time
end

local function server_seconds()
  local t = server_clock()
  return t[1] + t[2] / 1000000
end

local function fmt_int(n)
  return string.format('%d', n)
end

-- Audit entries get explicit stream ids "<server microseconds>-<n>": scripts run one at a time, so
-- on one server the ids of all tenants' streams interleave in true order (the client turns them into
-- AuditEvent.seq = us * 1000 + n). If the server clock stepped back, continue after the stream's top.
local audited = 0  -- events written by this script: they share one reading of the server clock
local function audit(kind, scope, token, amounts, detail)
  local t = server_clock()
  -- AuditEvent.seq = us * 1000 + n needs n < 1000: a script's 1000th event moves on a microsecond.
  local us = string.format('%d-*', t[1] * 1000000 + t[2] + (audited < 1000 and 0 or math.floor(audited / 1000)))
  audited = audited + 1
  local ok = redis.pcall('XADD', K_LOG, 'MAXLEN', '~', CAP, us, 'at', NOW,
    'k', kind, 's', scope, 'r', token, 'a', amounts, 'd', detail)
  if ok.err then  -- (a string, the new id, answers nil too)
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

-- Ledger data in the layout before budget ids (no migration: the project was unreleased) is refused
-- with an error reply rather than read as "no budget" or "no hold".
local function refuse_old(what)
  error({err = 'ERR clearance: ' .. what .. ' in the ledger layout before budget ids; clear this tenant\'s keys'})
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
  if #fields <= 1000 then
    return redis.call('HMGET', key, unpack(fields))
  end
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

-- HSET of field/value pairs, in chunks for the same reason (a hold can touch thousands of counters).
local function hset_pairs(key, pairs_list)
  if #pairs_list <= 1000 then
    redis.call('HSET', key, unpack(pairs_list))
    return
  end
  for first = 1, #pairs_list, 1000 do
    redis.call('HSET', key, unpack(pairs_list, first, math.min(first + 999, #pairs_list)))
  end
end

-- A reservation record is one tab-separated string (cheaper to write and read than JSON):
--   status, plan index (then '/' and the tenant's budgets version "#v" at hold time, when it had one),
--   created_at, expires_at, settled_at ('' while held), scope, amounts held
--   ("unit steps ..."), holds ("<id>|<window> steps <id>|<window> steps ...": the counter suffixes), windows,
--   committed amounts ('' unless committed), flags (','-joined), idempotency key ('' = none), label.
-- Only the label can contain a tab (idempotency keys are printable): it comes last.
local RECORD = '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$'

local function decode(raw)
  if string.byte(raw, 1) == 123 then
    refuse_old('a JSON reservation record')  -- '{': holds named by scope path
  end
  local st, p, c, e, t, s, a, h, w, ca, f, i, l = string.match(raw, RECORD)
  if h ~= '' and not string.find(h, '^%d+|[^| ]* ') then
    refuse_old('a reservation record with holds named by scope path')
  end
  local plan, version = string.match(p, '^([^/]*)/?(.*)$')
  return {st = st, p = plan, v = version, c = c, e = e, t = t, s = s, a = a, h = h, w = w, ca = ca, f = f, i = i,
    l = l}
end

-- `for_client`: as the client reads it, without the budgets version (the scripts' business).
local function encode(rec, for_client)
  local plan = (rec.v ~= '' and not for_client) and rec.p .. '/' .. rec.v or rec.p
  return rec.st .. '\t' .. plan .. '\t' .. rec.c .. '\t' .. rec.e .. '\t' .. rec.t .. '\t' .. rec.s .. '\t'
    .. rec.a .. '\t' .. rec.h .. '\t' .. rec.w .. '\t' .. rec.ca .. '\t' .. rec.f .. '\t' .. rec.i .. '\t' .. rec.l
end

local function load(token)
  local raw = redis.call('HGET', K_RES, token)
  if not raw then
    return nil
  end
  return decode(raw)
end

local function unhold(rec)
  for suffix, steps in string.gmatch(rec.h, '(%S+) (%S+)') do
    redis.call('HINCRBY', K_LEDGER, 'h' .. suffix, '-' .. steps)
  end
end

local function settle(token, rec, status)
  rec.st = status
  rec.t = NOW
  redis.call('HSET', K_RES, token, encode(rec))
  -- Retention runs from the later of the worker's clock and the server's: a worker whose clock is
  -- behind (commits are never refused for it) must not shorten it. With MAX_SKEW 0 every clock is
  -- trusted (a FakeClock in tests): the worker's alone, as on the other stores. An expired hold's
  -- runs from its expiry (when it is reclaimed differs by store; its expiry does not).
  local from = NOW_N
  if status == 'expired' then
    from = rec.e + 0
  elseif MAX_SKEW + 0 > 0 then
    local server = server_seconds()
    if server > from then
      from = server
    end
  end
  redis.call('ZADD', K_DUE, string.format('%.17g', -(from + RETENTION)), token)
end

local function expire(token, rec)
  unhold(rec)
  settle(token, rec, 'expired')
  audit('expire', rec.s, token, rec.a, '')
end

-- Expiry and retention are judged by the workers' clocks (ARGV[1]): a worker whose clock is behind
-- makes holds the others see as expired, one ahead reclaims holds still in use or forgets what is
-- still remembered — either could hand the same budget out twice, or run a job twice. So a script
-- that holds, extends or reclaims first refuses a worker whose clock is more than MAX_SKEW seconds
-- off the server's (0: trust the workers' clocks, e.g. a FakeClock in tests); commit and release,
-- which are never refused for it, do neither reclaim nor forget for such a worker (clock_ok).
local function clock_ok()
  local limit = MAX_SKEW + 0
  if limit > 0 then
    local skew = NOW_N - server_seconds()
    return skew <= limit and skew >= -limit, skew
  end
  return true, 0
end

local function check_clock()
  local ok, skew = clock_ok()
  if not ok then
    error({err = 'ERR clearance: clock_skew: this worker\'s clock is ' .. string.format('%.3f', skew)
      .. ' s off the Redis server\'s (max_clock_skew=' .. MAX_SKEW .. '); synchronise it (NTP)'})
  end
end

-- Forget a settled reservation: its record, its idempotency key (if still its own), its due entry.
local function forget(token, rec)
  if rec.i ~= '' and redis.call('HGET', K_RES, '!' .. rec.i) == token then
    redis.call('HDEL', K_RES, '!' .. rec.i)
  end
  redis.call('HDEL', K_RES, token)
  redis.call('ZREM', K_DUE, token)
end

-- Forgetting is lazy, like expiry: a settled reservation past its retention is forgotten when it is
-- looked up, whether or not reclaim (at most BATCH per call) has got to it. Its forget time is its
-- due score: minus the time once settled (plus the time on a ledger of 0.1).
local function forgotten_now(token, rec)
  if rec.st == 'held' then
    -- Expired more than a retention ago and not reached by a reclaim batch yet (they take the
    -- latest expiries first): expired now — its holds go back — and forgotten at once, as if
    -- reclaimed on time (the other stores reclaim every expired hold on the call). Kept, its
    -- idempotency key was answered 'replay_settled' for good instead of free again. (The usual
    -- held record, a commit's, is judged without the clock check: it costs a TIME.)
    if rec.e + RETENTION > NOW_N or not clock_ok() then
      return false
    end
    expire(token, rec)
    forget(token, rec)
    return true
  end
  if not clock_ok() then
    return false
  end
  local score = redis.call('ZSCORE', K_DUE, token)
  if not score then
    return false
  end
  local at = score + 0
  if at < 0 then
    at = -at
  end
  if at > NOW_N then
    return false
  end
  forget(token, rec)
  return true
end

-- A template budget past its "u<id>" time (see set_budget.lua) goes — its entry in "@<scope>", its id,
-- limit, windows and counters — unless it is in use: with something held on it, it is looked at again
-- a minute later (TEMPLATE_RECHECK; "u<id>" then ends in '!'), and once nothing is held any more, it
-- is kept a whole retention more. Records of settled reservations may still name its id: public()
-- skips it.
-- A template budget, or a removed budget's counters, kept until now + retention + extra (from the
-- later of the two clocks, as settle()): "u<id>" -> that time, "~<id>" in the due index scored by
-- minus it.
local function keep_template(id, extra)
  -- (summed left to right, as the other stores do: the same double to the last bit)
  local till = NOW_N + RETENTION + (extra or 0)
  if MAX_SKEW + 0 > 0 then
    till = math.max(till, server_seconds() + RETENTION + (extra or 0))
  end
  redis.call('HSET', K_LEDGER, 'u' .. id, string.format('%.17g', till))
  redis.call('ZADD', K_DUE, string.format('%.17g', -till), '~' .. id)
end

local function forget_template(id)
  local raw = redis.call('HGET', K_LEDGER, 'u' .. id)
  local till, held_seen = string.match(raw or '', '^([^!]+)(!?)$')
  if not till or till + 0 > NOW_N then  -- set by an operator since, or kept longer: its entry moved
    if not till then
      redis.call('ZREM', K_DUE, '~' .. id)
    end
    return
  end
  local name = redis.call('HGET', K_LEDGER, '#' .. id)
  local scope, unit, period = string.match(name or '', '^([^|]*)|([^|]*)|([^|]*)$')
  local field = '@' .. (scope or '')
  local kept, live = {}, false  -- the level's other budgets; whether this one is still set (else removed)
  for entry in string.gmatch(scope and redis.call('HGET', K_LEDGER, field) or '', '%S+') do
    if string.match(entry, '|(%d+)$') ~= id then
      kept[#kept + 1] = entry
    else
      live = true
    end
  end
  local windows = {''}
  if period and period ~= '' then
    windows = {}
    for window in string.gmatch(redis.call('HGET', K_LEDGER, 'w' .. id) or '', '([^ @]+)@?%d*') do
      windows[#windows + 1] = window
    end
  end
  local counters = {}
  local held = false
  for _, window in ipairs(windows) do
    local steps = redis.call('HGET', K_LEDGER, 'h' .. id .. '|' .. window)
    held = held or (steps and steps + 0 ~= 0)
    counters[#counters + 1] = 's' .. id .. '|' .. window
    counters[#counters + 1] = 'h' .. id .. '|' .. window
  end
  if held and not live then
    -- A removed one goes once nothing is held on it: looked at again then, its deadline ("u<id>")
    -- kept (set again meanwhile, it is judged by that deadline, whoever looked before).
    redis.call('ZADD', K_DUE, string.format('%.17g', -(NOW_N + 60)), '~' .. id)
    return
  end
  if held or (live and held_seen == '!') then
    local later = NOW_N + (held and 60 or RETENTION)
    local text = string.format('%.17g', later)
    redis.call('HSET', K_LEDGER, 'u' .. id, held and text .. '!' or text)
    redis.call('ZADD', K_DUE, string.format('%.17g', -later), '~' .. id)
    return
  end
  redis.call('ZREM', K_DUE, '~' .. id)
  redis.call('HDEL', K_LEDGER, 'u' .. id, 'l' .. id, 'w' .. id, '#' .. id, unpack(counters))
  if not scope then
    return
  end
  redis.call('HDEL', K_LEDGER, '=' .. name)
  if not live then
    return  -- a removed budget's counters, kept a retention (see remove_budget): gone now
  end
  if #kept == 0 then
    redis.call('HDEL', K_LEDGER, field)
  else
    redis.call('HSET', K_LEDGER, field, table.concat(kept, ' '))
  end
  redis.call('HINCRBY', K_LEDGER, '#v', 1)
  audit('budget_remove', scope, '', unit .. ' 0', 'period=' .. (period == '' and 'lifetime' or period) .. ' idle')
end

-- Lazy reclaim: return the tenant's expired holds to their budgets and drop settled reservations
-- past retention, at most BATCH per call, expired holds first. Returns expired, seen, forgotten.
local function reclaim()
  check_clock()
  -- Highest scores first: expired holds (their budget is waited for) before settled reservations
  -- to forget, those oldest first.
  local due = redis.call('ZREVRANGEBYSCORE', K_DUE, NOW, NOW_N > 0 and '-' .. NOW or string.format('%.17g', -NOW_N),
    'LIMIT', 0, BATCH)
  if #due == 0 then
    return 0, 0, 0
  end
  local expired, forgotten = 0, 0
  for _, token in ipairs(due) do
    local rec = nil
    if string.byte(token, 1) == 126 then  -- '~<id>': a template budget, not a reservation
      forget_template(string.sub(token, 2))
    else
      rec = load(token)
      if not rec then
        redis.call('ZREM', K_DUE, token)
      end
    end
    if rec and rec.st == 'held' then
      expire(token, rec)
      expired = expired + 1
    elseif rec then
      forget(token, rec)
      forgotten = forgotten + 1
    end
  end
  return expired, #due, forgotten
end

-- One reservation, expired first if its time has come (expiry iff expires_at <= now), nil once
-- forgotten: enough for commit, release and extend, which touch only that reservation's accounts.
local function load_current(token)
  local rec = load(token)
  if rec then
    if rec.st == 'held' then
      if rec.e + 0 <= NOW_N then
        -- Due: the tenant's other due holds go back too (as the other stores do on any call that
        -- meets an expired hold, and reserve here always does), so which of them are back does not
        -- depend on which reservation a caller touched first.
        if clock_ok() then
          reclaim()
          rec = load(token)
        end
        if rec and rec.st == 'held' then  -- (a worker whose clock is off, or past the batch)
          expire(token, rec)
        end
      end
    end
    -- (an expiry just reclaimed a retention after it came, no call meanwhile: forgotten now)
    if rec and forgotten_now(token, rec) then
      return nil
    end
  end
  return rec
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
-- {scope, unit, period, window, limit, spent, held, level, counter suffix "<id>|<window>", new window,
-- held counter field "h<suffix>"}, numbers as strings; "new window" is true for a period budget whose window has no counters yet
-- (a script writing them passes the entry to note_windows).
-- `extra` (optional) are more ledger fields read in the same HMGET as the budget index; their
-- values are returned second.
local function states(chain, wanted, windows_text, extra)
  local windows = nil  -- parsed only when a period budget shows up: lifetime budgets need no window
  local depth = #chain
  local index_fields = {}
  for i = 1, depth do
    index_fields[i] = '@' .. chain[i]
  end
  if extra then
    for i = 1, #extra do
      index_fields[depth + i] = extra[i]
    end
  end
  local index = hmget(K_LEDGER, index_fields)
  local out, fields = {}, {}
  for level = 1, depth do
    local entries = index[level]
    if entries then
      local scope = chain[level]
      for unit, period, limit, id in string.gmatch(entries, '([^ |]+)|([^ |]*)|([^ |]+)|?([^ ]*)') do
        if id == '' then
          refuse_old('a budget without an id')
        end
        if wanted == nil or wanted[unit] then
          local window = ''
          if period ~= '' then
            windows = windows or parse_windows(windows_text)
            window = windows[period]
          end
          local suffix = id .. '|' .. window
          local held_field = 'h' .. suffix
          out[#out + 1] = {scope, unit, period, window, limit, '0', '0', level, suffix, false, held_field}
          fields[#fields + 1] = 's' .. suffix
          fields[#fields + 1] = held_field
        end
      end
    end
  end
  if #fields > 0 then
    local counters = hmget(K_LEDGER, fields)
    for j, s in ipairs(out) do
      local spent, held = counters[2 * j - 1], counters[2 * j]
      s[6] = spent or '0'
      s[7] = held or '0'
      s[10] = s[3] ~= '' and not spent and not held  -- a period budget's window no script has written yet
    end
  end
  if extra then
    local values = {}
    for i = 1, #extra do
      values[i] = index[depth + i]
    end
    return out, values
  end
  return out
end

-- Past windows of period budgets are pruned: a budget keeps the counters of its KEEP_WINDOWS latest
-- windows, listed in "w<id>" -> "window@t window@t ..." (t: the server's clock, in seconds, when the
-- window was first written). Called with the entries of states() whose counters a script has just
-- written: a window written for the first time joins the list and, past the limit, the earliest
-- windows' counters are deleted — but only a window that is
--   * not among the KEEP_WINDOWS latest by id (ids of one period sort in time order, so the current
--     window is never the one deleted, even when a late commit re-opens an old window),
--   * first written before the KEEP_WINDOWS latest windows began by the server's clock (window ids
--     come from the workers' clocks: a worker whose clock runs ahead fills the list with future
--     windows, and must not push out the window the others are counting in now), and
--   * with nothing held in it (its holds settle there later); such a window waits for the next time.
-- Costs one HGET, one TIME and one HSET per budget per new window, nothing otherwise.
local function note_windows(entries)
  local KEEP_WINDOWS = 8  -- (clearance.periods.WINDOWS_KEPT; built here, not in the prelude: most calls open no window)
  local PERIOD_SECONDS = {minute = 60, hour = 3600, day = 86400, week = 604800}
  -- When the KEEP_WINDOWS latest windows of `period` began at server time `now` (UTC calendar, as
  -- clearance.periods.window_back): windows of fixed length (weeks from a Monday), months by the
  -- civil calendar (days -> year and month and back: H. Hinnant's algorithms).
  local function kept_since(now, period)
    local span = PERIOD_SECONDS[period]
    if span then
      local offset = period == 'week' and 345600 or 0  -- Monday 1970-01-05
      return math.floor((now - offset) / span) * span + offset - (KEEP_WINDOWS - 1) * span
    end
    local days = math.floor(now / 86400) + 719468
    local era = math.floor(days / 146097)
    local doe = days - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local year = yoe + era * 400 + (mp >= 10 and 1 or 0)
    local month = (mp < 10 and mp + 3 or mp - 9) - (KEEP_WINDOWS - 1)  -- 1-based, maybe <= 0
    year, month = year + math.floor((month - 1) / 12), (month - 1) % 12 + 1
    -- days from the epoch to the 1st of that month (the inverse: days_from_civil)
    local y = month <= 2 and year - 1 or year
    local e = math.floor(y / 400)
    local yoe2 = y - e * 400
    local doy2 = math.floor((153 * (month > 2 and month - 3 or month + 9) + 2) / 5)
    local doe2 = yoe2 * 365 + math.floor(yoe2 / 4) - math.floor(yoe2 / 100) + doy2
    return (e * 146097 + doe2 - 719468) * 86400
  end
  for _, s in ipairs(entries) do
    if s[10] then
      s[10] = false
      local id = string.match(s[9], '^(%d+)|')
      local field = 'w' .. id
      local known = {}
      local seen = false
      for window, first in string.gmatch(redis.call('HGET', K_LEDGER, field) or '', '([^ @]+)@?(%d*)') do
        known[#known + 1] = {window, tonumber(first) or 0}
        seen = seen or window == s[4]
      end
      if not seen then
        local now = tonumber(server_clock()[1])
        known[#known + 1] = {s[4], now}
        table.sort(known, function(a, b) return a[1] < b[1] end)
        local old_before = kept_since(now, s[3])
        local keep = {}
        local excess = #known - KEEP_WINDOWS
        for i, entry in ipairs(known) do
          local window = entry[1]
          local drop = false
          if i <= excess and entry[2] < old_before then
            local held = redis.call('HGET', K_LEDGER, 'h' .. id .. '|' .. window)
            drop = not held or tonumber(held) == 0
          end
          if drop then
            redis.call('HDEL', K_LEDGER, 's' .. id .. '|' .. window, 'h' .. id .. '|' .. window)
          else
            keep[#keep + 1] = window .. '@' .. fmt_int(entry[2])
          end
        end
        redis.call('HSET', K_LEDGER, field, table.concat(keep, ' '))
      end
    end
  end
end

-- States as one string "scope|unit|period|window|limit|spent|held|scope|..." (one reply element
-- instead of seven per budget); `held_now` (optional, counter suffix -> held as written) replaces
-- the held read of the counters it names.
local function states_text(list, held_now)
  local parts = {}
  for i, s in ipairs(list) do
    local held = held_now and held_now[s[9]] or s[7]
    parts[i] = s[1] .. '|' .. s[2] .. '|' .. s[3] .. '|' .. s[4] .. '|' .. s[5] .. '|' .. s[6] .. '|' .. held
  end
  return table.concat(parts, '|')
end

-- A record as the client reads it (get, list, extend): the holds' ids named again
-- ("<scope>|<unit>|<period>|<window> steps ..."), from the "#<id>" fields.
local function public(rec)
  if rec.h == '' then
    return encode(rec, true)
  end
  local ids, windows, steps = {}, {}, {}
  for id, window, n in string.gmatch(rec.h, '(%d+)|(%S*) (%S+)') do
    ids[#ids + 1] = '#' .. id
    windows[#windows + 1] = window
    steps[#steps + 1] = n
  end
  local names = hmget(K_LEDGER, ids)
  local parts = {}
  for i = 1, #ids do
    local name = names[i]
    if name then
      parts[#parts + 1] = name .. '|' .. windows[i] .. ' ' .. steps[i]
    elseif rec.st == 'held' then
      error({err = 'ERR clearance: no budget ' .. ids[i] .. ' named by a reservation record'})
    end  -- (a settled reservation's hold on a template budget forgotten since: nothing left to name)
  end
  local copy = {}
  for k, v in pairs(rec) do
    copy[k] = v
  end
  copy.h = table.concat(parts, ' ')
  return encode(copy, true)
end
