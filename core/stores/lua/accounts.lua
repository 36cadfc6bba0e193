-- accounts: budgets at a scope (or under it), each with its current window's counters, after
-- reclaiming expired holds. ARGV[5] scope ('' = the whole tenant), [6] '1' for the subtree,
-- [7] windows. Reply: {scope, unit, period, window, limit, spent, held, ...}.

local scope, subtree = ARGV[5], ARGV[6] == '1'
local windows = parse_windows(ARGV[7])
reclaim()
local budgets = {}
if not subtree and scope ~= '' then
  local index = redis.call('HGET', K_BUDGETS, '@' .. scope)
  if index then
    local fields = {}
    for word in string.gmatch(index, '%S+') do
      local unit, period = string.match(word, '^([^|]*)|(.*)$')
      budgets[#budgets + 1] = {scope, unit, period}
      fields[#fields + 1] = scope .. '|' .. word
    end
    local limits = hmget(K_BUDGETS, fields)
    for i, b in ipairs(budgets) do
      b[4] = limits[i]
    end
  end
else
  local prefix = scope .. '/'
  local all = redis.call('HGETALL', K_BUDGETS)
  for i = 1, #all, 2 do
    local field = all[i]
    if string.sub(field, 1, 1) ~= '@' then
      local path, unit, period = string.match(field, '^([^|]*)|([^|]*)|(.*)$')
      if scope == '' or path == scope or string.sub(path, 1, #prefix) == prefix then
        budgets[#budgets + 1] = {path, unit, period, all[i + 1]}
      end
    end
  end
end
local reply = {}
if #budgets == 0 then
  return reply
end
local fields = {}
for _, b in ipairs(budgets) do
  local suffix = b[1] .. '|' .. b[2] .. '|' .. b[3] .. '|' .. windows[b[3]]
  fields[#fields + 1] = 's|' .. suffix
  fields[#fields + 1] = 'h|' .. suffix
end
local counters = hmget(K_COUNTERS, fields)
for i, b in ipairs(budgets) do
  if b[4] then
    reply[#reply + 1] = b[1]
    reply[#reply + 1] = b[2]
    reply[#reply + 1] = b[3]
    reply[#reply + 1] = windows[b[3]]
    reply[#reply + 1] = b[4]
    reply[#reply + 1] = counters[2 * i - 1] or '0'
    reply[#reply + 1] = counters[2 * i] or '0'
  end
end
return reply
