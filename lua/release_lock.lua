--[[
release_lock.lua: release a recovery lock, only if the caller still holds it.

A recovery of a bucketed promotion locks each lost bucket; when it cannot
take them all (another recovery holds one) or stops early, it releases the
ones it took, so the next recovery need not wait out their TTL.

KEYS[1]  {P:p:ID...}:recovering  string  the recovery lock's token

ARGV[1]  the caller's lock token

Returns (named in Rust as `stock::lua::codes::release_lock`):
  1  released
  0  the caller did not hold it (it lapsed, or another took it): unchanged

Invariants:
  - only the holder of a lock deletes it (compare and delete, atomic).
]]

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
