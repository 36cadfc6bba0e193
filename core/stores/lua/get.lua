-- get: one reservation (expired first if due). ARGV[3] token. Reply: "notfound" or "ok\n<record>".

check_clock()  -- looking a reservation up may expire it: not by a clock that is off
local rec = load_current(ARGV[3])
if not rec then
  return 'notfound'
end
return 'ok\n' .. public(rec)
