-- extend: push a held reservation's expiry. ARGV[5] token, [6] expires_at, [7] audit detail.
-- Reply: {'notfound'}, {'closed', status} or {'ok', record}.

local token, expires_at, detail = ARGV[5], ARGV[6], ARGV[7]
reclaim()
local rec = load(token)
if not rec then
  return {'notfound'}
end
if rec.st ~= 'held' then
  return {'closed', rec.st}
end
rec.e = expires_at
store(token, rec)
redis.call('ZADD', K_EXP, expires_at, token)
audit('extend', rec.s, token, '', detail)
return {'ok', cjson.encode(rec)}
