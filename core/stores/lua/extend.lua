-- extend: push a held reservation's expiry (never earlier than it is). ARGV[3] token, [4] expires_at, [5] audit detail, [6] '1' on
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
if (ARGV[6] == '1' and rec.e == expires_at) or expires_at + 0 <= rec.e + 0 then
  return 'ok\n' .. public(rec)  -- (it lives that long already: an extend never shortens a hold)
end
rec.e = expires_at
local raw = encode(rec)
redis.call('HSET', K_RES, token, raw)
redis.call('ZADD', K_DUE, expires_at, token)
audit('extend', rec.s, token, '', detail)
return 'ok\n' .. public(rec)
