-- extend: push a held reservation's expiry. ARGV[3] token, [4] expires_at, [5] audit detail.
-- Reply: {'notfound'}, {'closed', status} or {'ok', record}.

local token, expires_at, detail = ARGV[3], ARGV[4], ARGV[5]
local rec = load_current(token)
if not rec then
  return {'notfound'}
end
if rec.st ~= 'held' then
  return {'closed', rec.st}
end
rec.e = expires_at
store(token, rec)
redis.call('ZADD', K_DUE, expires_at, token)
audit('extend', rec.s, token, '', detail)
return {'ok', cjson.encode(rec)}
