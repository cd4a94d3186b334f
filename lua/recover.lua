--[[
recover.lua: rebuild a promotion's sale state from the counts PostgreSQL
(and whatever remains of the stream) gives, when Redis lost it.

Run by `seckill recover` and at start-up, after refill.lua refilled the
buyers, results, returned and won keys. Until this script has run, the meta
hash is missing (or holds counters without `starts_ms`, as a replica that
missed the preheat may) and purchase.lua answers "unknown" for the
promotion, so
nothing is sold from a half-rebuilt state. A recovery holds the promotion's
`recovering` lock (SET NX with a TTL, its value a token of its own) from
before it reads PostgreSQL; this script, like refill.lua, writes only while
the caller still holds it, so a recovery whose lock lapsed (paused, slow)
can never overwrite the state a later one rebuilt and buyers changed since.

KEYS[1]  {P:p:ID}:meta     hash (see purchase.lua)
KEYS[2]  {P:p:ID}:stock    string
KEYS[3]  {P:p:ID}:orders   stream
KEYS[4]  {P:p:ID}:recovering  string  the recovery lock's token

ARGV[1]     promotion id
ARGV[2..7]  starts_ms, ends_ms, limit, price_cents, initial stock,
            require_token (as preheat.lua)
ARGV[8]     the workers' consumer group name
ARGV[9]     require_captcha (0 or 1)
ARGV[10]    sold: orders that exist (in PostgreSQL or still in the stream)
ARGV[11]    returned: cancelled orders whose unit is back
ARGV[12]    the caller's lock token
ARGV[13..16] optional, for a bucket of a bucketed promotion: the bucket's
            share of the initial stock, the number of buckets, and the units
            moved out of and into the bucket by transfers (recounted by
            recovery from the other buckets' records)

Returns (`stock::lua::codes::recover`) 1 when the state was rebuilt (the lock
is released), 0 when the meta was loaded (it has `starts_ms`: nothing
changed, running recovery twice is harmless), 2 when the caller no longer holds the lock (nothing
changed).

Invariants:
  - stock = initial - sold + returned (for a bucket: share - sold + returned
    - moved_out + moved_in), never below zero;
  - the state appears at once (meta is written last, in this one call);
  - only the holder of the lock writes.
]]

if redis.call('HEXISTS', KEYS[1], 'starts_ms') == 1 then
  return 0
end
if redis.call('GET', KEYS[4]) ~= ARGV[12] then
  return 2
end

local sold = tonumber(ARGV[10])
local returned = tonumber(ARGV[11])
local initial = tonumber(ARGV[6])
if ARGV[13] then
  initial = tonumber(ARGV[13]) - tonumber(ARGV[15]) + tonumber(ARGV[16])
end
local left = initial - sold + returned
if left < 0 then left = 0 end
redis.call('SET', KEYS[2], left)

local ok = redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[8], '0', 'MKSTREAM')
if type(ok) == 'table' and ok.err and not string.find(ok.err, 'BUSYGROUP') then
  return redis.error_reply(ok.err)
end

-- A meta without `starts_ms` (counters only) is replaced whole.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1],
  'id', ARGV[1],
  'starts_ms', ARGV[2],
  'ends_ms', ARGV[3],
  'limit', ARGV[4],
  'price_cents', ARGV[5],
  'stock', ARGV[6],
  'require_token', ARGV[7],
  'require_captcha', ARGV[9],
  'sold', sold,
  'returned', returned)
if ARGV[13] then
  redis.call('HSET', KEYS[1], 'share', ARGV[13], 'buckets', ARGV[14],
    'moved_out', ARGV[15], 'moved_in', ARGV[16])
end
redis.call('DEL', KEYS[4])
return 1
