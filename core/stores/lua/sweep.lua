-- sweep: one batch of the tenant's reclaim. Reply {expired, due seen, forgotten}; the client calls
-- again while a batch came back full.

local expired, due, forgotten = reclaim()
return {expired, due, forgotten}
