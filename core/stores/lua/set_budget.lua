-- set_budget: create or change a budget's limit (counters are kept).
-- ARGV[3] scope, [4] unit, [5] period, [6] limit, [7] audit detail, [8] '1' = only if there is none
-- (budget templates: an operator's own change is never undone), [9] a flag: 1 on the client's retry
-- after a lost reply (a budget that already has this limit was set by the first run: no second audit
-- event), plus 2 when it asks again after draining a backlog of expired holds (see forget_if_due).
-- Reply 1 if set (2 if it was the tenant's first budget id: see the end), 0 if it existed; 'backlog' (nothing changed) while more expired holds wait than one
-- call reclaims and a budget kept past its time is met again (see forget_if_due).
-- A template budget (ARGV[8] = '1') is kept until now + retention ("u<id>" -> that time, and "~<id>"
-- in the due index scored by minus it, so reclaim finds it like a reservation to forget; and 2 *
-- REFRESH more), pushed that far again by a later template call once less than a retention and
-- REFRESH is left (kept a retention past its last use: see Store.ensure_budget); then reclaim
-- forgets it (see forget_template in common.lua). Set by an operator, it is an operator's budget, kept for good.
-- A scope's budgets live in one field, "@<scope>" -> "unit|period|limit|id ...", in the order they
-- were first set, so reserve reads every level's budgets with one HMGET. The id names the budget's
-- counters ("s<id>|<window>", "h<id>|<window>"); a (scope, unit, period) keeps its id while it is set
-- and a retention after it is removed ("=<scope>|<unit>|<period>"), so a budget removed and set
-- again by then continues its counters (see remove_budget.lua).

local scope, unit, period, limit, detail, only_new = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local flag = tonumber(ARGV[9])
-- clearance.stores.base.template_refresh: how often the Authority ensures a template it keeps using
local REFRESH = math.min(3600, RETENTION / 8)
local retry, drained = flag % 2 == 1, flag >= 2
local name = scope .. '|' .. unit .. '|' .. period

-- A template idle past its time (or a removed budget's counters past theirs) met again before
-- reclaim forgot it: as if it had (a new count), whichever comes first — holds due to expire
-- expired first, as a sweep would. (forget_template leaves one in use. Not for a worker whose
-- clock is off the server's: like reclaim, it would forget a budget still in use.) More expired
-- holds than one batch: one not reached yet would look like a hold in use (the run's old count
-- kept), so the script answers 'backlog' having changed nothing else, and the client drains the
-- tenant and asks again (then one batch does: new expiries meanwhile, a flood, must not make it
-- fail). True when it did.
local function forget_if_due(id)
  local till = string.match(redis.call('HGET', K_LEDGER, 'u' .. id) or '', '^([^!]+)')
  if till and till + 0 <= NOW_N and clock_ok() then
    if reclaim() >= BATCH + 0 and not drained then
      return false
    end
    forget_template(id)
  end
  return true
end

if only_new == '1' then
  local id = redis.call('HGET', K_LEDGER, '=' .. name)
  if id and not forget_if_due(id) then
    return 'backlog'
  end
end
local field = '@' .. scope
local head = unit .. '|' .. period .. '|'
local kept, found, limit_field = {}, false, nil
local first = false  -- the tenant's first budget id given out here (see the reply)
for entry in string.gmatch(redis.call('HGET', K_LEDGER, field) or '', '%S+') do
  if string.sub(entry, 1, #head) == head then
    found = true
    local current, id = string.match(entry, '^[^|]*|[^|]*|([^|]*)|(%d+)$')
    if not id then
      refuse_old('a budget without an id')
    end
    local till = string.match(redis.call('HGET', K_LEDGER, 'u' .. id) or '', '^([^!]+)')  -- (see forget_template)
    if only_new == '1' then
      if till and till + 0 < NOW_N + RETENTION + REFRESH then
        keep_template(id, 2 * REFRESH)
      end
      return 0
    end
    -- (Still a template, it was not set by a first run of this call, which would have made it an
    -- operator's: taken over now, with its audit event.)
    if retry and current == limit and not till then
      return id == '1' and 2 or 1  -- (2: as the first run answered, see the end)
    end
    if till then  -- an operator's from now on
      redis.call('HDEL', K_LEDGER, 'u' .. id)
      redis.call('ZREM', K_DUE, '~' .. id)
    end
    kept[#kept + 1] = head .. limit .. '|' .. id
    limit_field = 'l' .. id
  else
    kept[#kept + 1] = entry
  end
end
if not found then
  local id = redis.call('HGET', K_LEDGER, '=' .. name)
  if id and only_new ~= '1' then  -- a removed budget's counters (see remove_budget): go on, or start anew
    if not forget_if_due(id) then
      return 'backlog'
    end
    id = redis.call('HGET', K_LEDGER, '=' .. name)
    if id and redis.call('HDEL', K_LEDGER, 'u' .. id) == 1 then  -- an operator's from now on
      redis.call('ZREM', K_DUE, '~' .. id)
    end
  end
  if not id then
    id = fmt_int(redis.call('HINCRBY', K_LEDGER, '#next', 1))
    redis.call('HSET', K_LEDGER, '=' .. name, id, '#' .. id, name)
    first = id == '1'
  end
  kept[#kept + 1] = head .. limit .. '|' .. id
  limit_field = 'l' .. id
  if only_new == '1' then
    keep_template(id, 2 * REFRESH)
  end
  redis.call('HINCRBY', K_LEDGER, '#v', 1)  -- a new budget on this chain: holds made before do not name it
end
redis.call('HSET', K_LEDGER, field, table.concat(kept, ' '), limit_field, limit)
audit('budget_set', scope, '', unit .. ' ' .. limit, detail)
-- 2: the tenant's first budget id — a new tenant, or one whose keys Redis lost (a restart without
-- persistence, a FLUSHALL), which a process that registered it before registers again.
return first and 2 or 1
