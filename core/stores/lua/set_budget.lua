-- set_budget: create or change a budget's limit (counters are kept).
-- ARGV[3] scope, [4] unit, [5] period, [6] limit, [7] audit detail, [8] '1' = only if there is none
-- (budget templates: an operator's own change is never undone). Reply 1 if set, 0 if it existed.
-- A scope's budgets live in one field, "@<scope>" -> "unit|period|limit ...", in the order they were
-- first set, so reserve reads every level's budgets with one HMGET.

local scope, unit, period, limit, detail, only_new = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local field = '@' .. scope
local head = unit .. '|' .. period .. '|'
local kept, found = {}, false
for entry in string.gmatch(redis.call('HGET', K_LEDGER, field) or '', '%S+') do
  if string.sub(entry, 1, #head) == head then
    found = true
    if only_new == '1' then
      return 0
    end
    kept[#kept + 1] = head .. limit
  else
    kept[#kept + 1] = entry
  end
end
if not found then
  kept[#kept + 1] = head .. limit
end
redis.call('HSET', K_LEDGER, field, table.concat(kept, ' '))
audit('budget_set', scope, '', unit .. ' ' .. limit, detail)
return 1
