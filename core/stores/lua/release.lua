-- release: free the whole hold; idempotent (a settled reservation is answered as it is).
-- ARGV[3] token. Reply: "notfound" or "status\n\nflags\nreplayed ('1'/'0')".

local token = ARGV[3]
local rec = load_current(token)
if not rec then
  return 'notfound'
end
if rec.st ~= 'held' then
  return rec.st .. '\n\n' .. rec.f .. '\n1'
end
unhold(rec)
settle(token, rec, 'released')
audit('release', rec.s, token, rec.a, '')
return 'released\n\n\n0'
