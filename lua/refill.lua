--[[
refill.lua: write one chunk of a promotion's rebuilt buyers, results,
returned or won orders, for the recovery that holds the promotion's lock.

Recovery reads PostgreSQL (and what is left of the stream), then writes the
sale state in chunks with this script and finishes with recover.lua, which
writes the meta last. Each chunk is written only while the meta is still
not loaded (missing, or counters without `starts_ms`) and the caller still holds the lock, so two recoveries can never mix
their writes, and a late one can never overwrite buyers' counts after the
sale reopened. Each call also extends the lock, so a long recovery keeps it.

KEYS[1]  {P:p:ID}:meta        hash (see purchase.lua): must not be loaded
KEYS[2]  {P:p:ID}:recovering  string  the recovery lock's token
KEYS[3]  {P:p:ID}:buyers      hash  user id -> units bought
KEYS[4]  {P:p:ID}:results     hash  user id -> order id of the latest purchase
KEYS[5]  {P:p:ID}:returned    set   ids of the orders whose unit came back
KEYS[6]  {P:p:ID}:won         hash  order id -> user id, every order accepted

ARGV[1]  the caller's lock token
ARGV[2]  the lock's TTL in milliseconds (extended on every call)
ARGV[3]  what this chunk holds: `buyers`, `returned` or `won`
ARGV[4..] for `buyers`: triples user id, units bought, latest order id;
          for `returned`: order ids; for `won`: pairs order id, user id

Returns (named in Rust as `stock::lua::codes::refill`):
  1  written
  2  refused: the meta is loaded or the caller lost the lock (nothing written)

Invariants:
  - nothing is written once the meta is loaded (the sale is open again);
  - only the holder of the lock writes;
  - the values are derived from PostgreSQL, so writing a chunk twice writes
    the same thing.
]]

if redis.call('HEXISTS', KEYS[1], 'starts_ms') == 1 or redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 2
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])

local kind = ARGV[3]
if kind == 'buyers' then
  for i = 4, #ARGV, 3 do
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 2])
  end
elseif kind == 'returned' then
  for i = 4, #ARGV, 1000 do
    redis.call('SADD', KEYS[5], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
elseif kind == 'won' then
  for i = 4, #ARGV, 2 do
    redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
  end
else
  return redis.error_reply('refill.lua: unknown chunk kind ' .. tostring(kind))
end
return 1
