--[[
transfer_in.lua: step 2 of a transfer between two buckets of a promotion:
add the units taken by transfer_out.lua to the destination bucket, once.

KEYS[1]  {P:p:ID:bD}:meta      hash (see purchase.lua); `moved_in` counted here
KEYS[2]  {P:p:ID:bD}:stock     string  units left on sale in the destination
KEYS[3]  {P:p:ID:bD}:received  hash  transfer id -> "units:source"

ARGV[1]  the transfer id
ARGV[2]  the units the source recorded for it (>= 1)
ARGV[3]  the source bucket

Returns (named in Rust as `stock::lua::codes::transfer_in`):
   1  the units are added to the destination's stock
   0  this transfer was received before (a replay): nothing changed
  -1  the destination has no state (lost); nothing changed, the transfer
      stays in transit until recovery rebuilds the bucket and finishes it

Invariants:
  - a transfer id adds its units at most once: the record and the INCRBY
    happen together or not at all;
  - stock + sold - returned + moved_out - moved_in = share holds for the
    bucket afterwards.
]]

if redis.call('HEXISTS', KEYS[1], 'starts_ms') == 0 then
  return -1
end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 0
end
redis.call('INCRBY', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'moved_in', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
return 1
