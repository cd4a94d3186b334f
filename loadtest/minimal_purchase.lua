--[[
minimal_purchase.lua: the least a purchase can do in Redis, for the benchmark
only (loadtest/bench.sh, step 1): the reference the gateway's purchases/s is
measured against. Never used by seckill itself.

KEYS[1]  stock   string  units left
KEYS[2]  buyers  hash    user id -> units bought
KEYS[3]  orders  stream  one entry per unit taken

ARGV[1]  user id
ARGV[2]  order id

Returns 1 bought, 0 sold out, 2 already purchased (limit 1).
]]

if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return 2
end
if tonumber(redis.call('GET', KEYS[1]) or '0') <= 0 then
  return 0
end
redis.call('DECR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], 1)
redis.call('XADD', KEYS[3], '*', 'order_id', ARGV[2], 'user_id', ARGV[1])
return 1
