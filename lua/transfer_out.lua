--[[
transfer_out.lua: step 1 of a transfer between two buckets of a promotion:
take up to N units from the source bucket's stock and record them in transit.

A bucketed promotion (`buckets` > 1) keeps one stock per bucket; a bucket
that ran dry takes units from another in three steps, each in one bucket
(one hash tag): this one on the source, transfer_in.lua on the destination,
transfer_done.lua on the source again. See docs/decisions.md.

KEYS[1]  {P:p:ID:bS}:meta       hash (see purchase.lua); `moved_out` counted here
KEYS[2]  {P:p:ID:bS}:stock      string  units left on sale in the source bucket
KEYS[3]  {P:p:ID:bS}:transfers  hash  transfer id -> "units:destination:state",
                                state 0 in transit, 1 done

ARGV[1]  the transfer id (unique, minted by the caller)
ARGV[2]  units wanted (>= 1)
ARGV[3]  the destination bucket

Returns (named in Rust as `stock::lua::codes::transfer_out`):
  n >= 1  the units taken (at most ARGV[2]); also the answer of a replayed
          call for a transfer id recorded before (nothing is taken again;
          the record is written again as it is, so that a WAIT after the
          replay covers the step: recovery replays a transfer in transit
          before it adds its units to the destination)
   0      the source has no unit on sale; nothing is recorded
  -1      the source bucket has no state (lost); nothing changed

Invariants:
  - stock never goes below zero;
  - the units leave the stock and enter the transit record together, so
    stock + sold - returned + moved_out - moved_in = share holds for the
    bucket, and over the promotion on sale + sold - returned + in transit =
    stock (in transit = sum of moved_out - sum of moved_in);
  - a transfer id takes units at most once.
]]

if redis.call('HEXISTS', KEYS[1], 'starts_ms') == 0 then
  return -1
end
local recorded = redis.call('HGET', KEYS[3], ARGV[1])
if recorded then
  redis.call('HSET', KEYS[3], ARGV[1], recorded)
  return tonumber(string.match(recorded, '^(%d+)'))
end
local stock = tonumber(redis.call('GET', KEYS[2]) or '0')
local take = math.min(stock, tonumber(ARGV[2]))
if take <= 0 then
  return 0
end
redis.call('DECRBY', KEYS[2], take)
redis.call('HINCRBY', KEYS[1], 'moved_out', take)
redis.call('HSET', KEYS[3], ARGV[1], take .. ':' .. ARGV[3] .. ':0')
return take
