-- remove_budget: remove one budget; its level no longer constrains that unit. Reply 1, or 0 if none.
-- Its counters and its id ("=<scope>|<unit>|<period>", "#<id>") stay a retention ("u<id>" and "~<id>"
-- in the due index, as a template's): set again by then, it continues them; after, once nothing is
-- held on them, forget_template forgets them.
-- ARGV[3] scope, [4] unit, [5] period, [6] audit detail.

local scope, unit, period, detail = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local field = '@' .. scope
local head = unit .. '|' .. period .. '|'
local kept, found = {}, false
for entry in string.gmatch(redis.call('HGET', K_LEDGER, field) or '', '%S+') do
  if string.sub(entry, 1, #head) == head then
    found = true
    local id = string.match(entry, '|(%d+)$')
    if id then  -- (a template's too: removed like any other)
      keep_template(id)
    end
  else
    kept[#kept + 1] = entry
  end
end
if not found then
  return 0
end
redis.call('HINCRBY', K_LEDGER, '#v', 1)  -- holds made before name a budget that is gone
if #kept == 0 then
  redis.call('HDEL', K_LEDGER, field)
else
  redis.call('HSET', K_LEDGER, field, table.concat(kept, ' '))
end
audit('budget_remove', scope, '', unit .. ' 0', detail)
return 1
