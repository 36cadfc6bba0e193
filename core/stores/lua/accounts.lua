-- accounts: budgets at a scope (or under it), each with its current window's counters, after
-- reclaiming expired holds. ARGV[3] scope ('' = the whole tenant), [4] '1' for the subtree,
-- [5] windows. Reply: one '|'-joined text, 7 fields per budget; or 'backlog' when a full batch of
-- expired holds was reclaimed (more may wait: the client sweeps the tenant and asks again).

local scope, subtree = ARGV[3], ARGV[4] == '1'
local windows = ARGV[5]
if reclaim() >= BATCH + 0 then
  return 'backlog'
end
local scopes = {}
if not subtree and scope ~= '' then
  scopes[1] = scope
else
  local prefix = scope .. '/'
  local all = redis.call('HGETALL', K_LEDGER)
  for i = 1, #all, 2 do
    local field = all[i]
    if string.sub(field, 1, 1) == '@' then
      local path = string.sub(field, 2)
      if scope == '' or path == scope or string.sub(path, 1, #prefix) == prefix then
        scopes[#scopes + 1] = path
      end
    end
  end
end
local list = {}
for start = 1, #scopes, 16 do
  local batch = {}
  for i = start, math.min(start + 15, #scopes) do
    batch[#batch + 1] = scopes[i]
  end
  for _, s in ipairs(states(batch, nil, windows)) do
    list[#list + 1] = s
  end
end
return states_text(list, nil)
