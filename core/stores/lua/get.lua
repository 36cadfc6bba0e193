-- get: one reservation, after reclaiming what has expired. ARGV[5] token.
-- Reply: {'notfound'} or {'ok', record}.

reclaim()
local raw = redis.call('HGET', K_RES, ARGV[5])
if not raw then
  return {'notfound'}
end
return {'ok', raw}
