-- extend: push a held reservation's expiry. ARGV[3] token, [4] expires_at, [5] audit detail, [6] '1' on
-- the client's retry after a lost reply (an expiry already set to this value: no second audit event).
-- Reply: "notfound", "closed\n<status>" or "ok\n<record>" (as public() shows it).

local token, expires_at, detail = ARGV[3], ARGV[4], ARGV[5]
check_clock()
local rec = load_current(token)
if not rec then
  return 'notfound'
end
if rec.st ~= 'held' then
  return 'closed\n' .. rec.st
end
if ARGV[6] == '1' and rec.e == expires_at then
  return 'ok\n' .. public(rec)
end
rec.e = expires_at
local raw = encode(rec)
redis.call('HSET', K_RES, token, raw)
redis.call('ZADD', K_DUE, expires_at, token)
audit('extend', rec.s, token, '', detail)
return 'ok\n' .. public(rec)
