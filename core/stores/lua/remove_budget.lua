-- remove_budget: remove one budget; its level no longer constrains that unit. Reply 1, or 0 if none.
-- ARGV[5] scope, [6] unit, [7] period, [8] audit detail.

local scope, unit, period, detail = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local entry = unit .. '|' .. period
if redis.call('HDEL', K_BUDGETS, scope .. '|' .. entry) == 0 then
  return 0
end
local kept = {}
for word in string.gmatch(redis.call('HGET', K_BUDGETS, '@' .. scope) or '', '%S+') do
  if word ~= entry then
    kept[#kept + 1] = word
  end
end
if #kept == 0 then
  redis.call('HDEL', K_BUDGETS, '@' .. scope)
else
  redis.call('HSET', K_BUDGETS, '@' .. scope, table.concat(kept, ' '))
end
audit('budget_remove', scope, '', unit .. ' 0', detail)
return 1
