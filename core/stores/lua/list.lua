-- list: the tenant's reservations at or under a scope, newest first.
-- ARGV[3] scope ('' = the whole tenant), [4] status ('' = any), [5] limit.
-- Reply: {token, record, token, record, ...}, or {'backlog'} when a full batch of expired holds was
-- reclaimed (more may wait: the client sweeps the tenant and asks again). Held ones come from the positive scores of the due
-- index (live holds only);
-- any other status scans every reservation the tenant remembers (retention): an admin listing.

local scope, status, limit = ARGV[3], ARGV[4], tonumber(ARGV[5])
if reclaim() >= BATCH + 0 then
  return {'backlog'}
end
local tokens
if status == 'held' then
  tokens = redis.call('ZRANGEBYSCORE', K_DUE, '(0', '+inf')  -- live holds only: small
else
  -- Everything remembered: an admin scan. Not what is past retention (a settled reservation's
  -- score is minus its forget time) that reclaim, a batch per call, has not forgotten yet.
  tokens = {}
  local scored = redis.call('ZRANGE', K_DUE, 0, -1, 'WITHSCORES')
  for i = 1, #scored, 2 do
    local score = scored[i + 1] + 0
    if score > 0 or -score > NOW_N then
      tokens[#tokens + 1] = scored[i]
    end
  end
end
local prefix = scope .. '/'
local found = {}
for _, t in ipairs(tokens) do
  local raw = redis.call('HGET', K_RES, t)
  if raw then
    local rec = decode(raw)
    if (status == '' or rec.st == status)
        and (scope == '' or rec.s == scope or string.sub(rec.s, 1, #prefix) == prefix) then
      found[#found + 1] = {tonumber(rec.c), t, rec}
    end
  end
end
-- Newest first; made at the same moment, by token, lowest first: the order the client merges
-- tenants' listings in (by id), so a listing cut at any limit is the start of a longer one.
table.sort(found, function(a, b)
  if a[1] ~= b[1] then
    return a[1] > b[1]
  end
  return a[2] < b[2]
end)
local reply = {}
for i = 1, math.min(limit, #found) do
  reply[#reply + 1] = found[i][2]
  reply[#reply + 1] = public(found[i][3])
end
return reply
