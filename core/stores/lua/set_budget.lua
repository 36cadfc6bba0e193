-- set_budget: create or change a budget's limit (counters are kept).
-- ARGV[5] scope, [6] unit, [7] period, [8] limit, [9] audit detail, [10] '1' = only if there is none
-- (budget templates: an operator's own change is never undone). Reply 1 if set, 0 if it existed.
-- The budgets hash also keeps "@<scope>" -> "unit|period ..." so a balance reads one scope directly.

local scope, unit, period, limit, detail = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local entry = unit .. '|' .. period
if ARGV[10] == '1' and redis.call('HEXISTS', K_BUDGETS, scope .. '|' .. entry) == 1 then
  return 0
end
redis.call('HSET', K_BUDGETS, scope .. '|' .. entry, limit)
local index = redis.call('HGET', K_BUDGETS, '@' .. scope) or ''
local present = false
for word in string.gmatch(index, '%S+') do
  if word == entry then
    present = true
  end
end
if not present then
  if index == '' then
    index = entry
  else
    index = index .. ' ' .. entry
  end
  redis.call('HSET', K_BUDGETS, '@' .. scope, index)
end
audit('budget_set', scope, '', unit .. ' ' .. limit, detail)
return 1
