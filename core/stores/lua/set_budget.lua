-- set_budget: create or change a budget's limit (counters are kept).
-- ARGV[5] scope, [6] unit, [7] period, [8] limit, [9] audit detail.
-- The budgets hash also keeps "@<scope>" -> "unit|period ..." so a balance reads one scope directly.

local scope, unit, period, limit, detail = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local entry = unit .. '|' .. period
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
