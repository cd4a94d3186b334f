--[[
transfer_done.lua: step 3 of a transfer between two buckets of a promotion:
mark the source's record done once the destination has the units.

KEYS[1]  {P:p:ID:bS}:transfers  hash (see transfer_out.lua)

ARGV[1]  the transfer id

Returns (named in Rust as `stock::lua::codes::transfer_done`):
   1  the record is marked done (state 1)
   0  it was done already (a replay)
  -1  the source has no record of it (the source bucket was lost and
      rebuilt, which counted the units where they are): nothing changed

Invariants:
  - only the state changes; the units were counted by steps 1 and 2, so
    a record in state 0 whose id the destination has received is not in
    transit any more, and recovery marks it done.
]]

local recorded = redis.call('HGET', KEYS[1], ARGV[1])
if not recorded then
  return -1
end
local units, dest, state = string.match(recorded, '^(%d+):(%d+):(%d+)$')
if state == '1' then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], units .. ':' .. dest .. ':1')
return 1
