--[[
preheat.lua: load (or reload) a promotion's sale state into Redis.

Called when a promotion is created, and when it is edited before it starts.
After it returns, purchase.lua can sell the promotion.

KEYS[1]  {P:p:ID}:meta     hash (see purchase.lua)
KEYS[2]  {P:p:ID}:stock    string  units left on sale
KEYS[3]  {P:p:ID}:orders   stream  the order stream

ARGV[1]  promotion id
ARGV[2]  starts_ms, ARGV[3] ends_ms (Unix milliseconds)
ARGV[4]  per-user limit
ARGV[5]  price in cents
ARGV[6]  initial stock
ARGV[7]  require_token (0 or 1)
ARGV[8]  the workers' consumer group name
ARGV[9]  require_captcha (0 or 1)
ARGV[10] optional, for a bucket of a bucketed promotion (`buckets` > 1): the
         bucket's share of the initial stock (`stock` stays the promotion's)
ARGV[11] optional, with ARGV[10]: the promotion's number of buckets

Returns the units left on sale after the call.

Invariants:
  - stock is set to initial - sold + returned (for a bucket: share - sold +
    returned - moved_out + moved_in, the units its transfers moved), so reloading the meta of a
    promotion never forgets a unit already sold or returned, and calling the
    script twice changes nothing;
  - the consumer group exists (created at the start of the stream) before any
    order can be appended, so no order message is ever missed by the workers.
]]

redis.call('HSET', KEYS[1],
  'id', ARGV[1],
  'starts_ms', ARGV[2],
  'ends_ms', ARGV[3],
  'limit', ARGV[4],
  'price_cents', ARGV[5],
  'stock', ARGV[6],
  'require_token', ARGV[7],
  'require_captcha', ARGV[9])
local sold = tonumber(redis.call('HGET', KEYS[1], 'sold') or '0')
local returned = tonumber(redis.call('HGET', KEYS[1], 'returned') or '0')
if sold == 0 then redis.call('HSET', KEYS[1], 'sold', 0) end
if returned == 0 then redis.call('HSET', KEYS[1], 'returned', 0) end

local initial = tonumber(ARGV[6])
if ARGV[10] then
  redis.call('HSET', KEYS[1], 'share', ARGV[10], 'buckets', ARGV[11])
  local moved = redis.call('HMGET', KEYS[1], 'moved_out', 'moved_in')
  initial = tonumber(ARGV[10]) - tonumber(moved[1] or '0') + tonumber(moved[2] or '0')
end
local left = initial - sold + returned
if left < 0 then left = 0 end
redis.call('SET', KEYS[2], left)

local ok = redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[8], '0', 'MKSTREAM')
if type(ok) == 'table' and ok.err and not string.find(ok.err, 'BUSYGROUP') then
  return redis.error_reply(ok.err)
end

return left
