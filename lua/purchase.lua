--[[
purchase.lua: take one unit of a promotion for each buyer in a list, atomically.

The whole sale decision lives here, so that no interleaving of gateways can
oversell, sell a buyer more than the limit, or confirm an order that has no
message in the stream.

KEYS[1]  {P:p:ID}:meta     hash  id, starts_ms, ends_ms, limit, price_cents,
                                 stock (initial), sold, returned,
                                 require_token, require_captcha
KEYS[2]  {P:p:ID}:stock    string  units left on sale
KEYS[3]  {P:p:ID}:buyers   hash  user id -> units bought
KEYS[4]  {P:p:ID}:orders   stream  one entry per unit taken, read by the workers
KEYS[5]  {P:p:ID}:results  hash  user id -> order id of the buyer's latest purchase
KEYS[6]  {P:p:ID}:won      hash  order id -> user id, for every order accepted so far

ARGV[1]          n, the number of buyers in this call (>= 1)
ARGV[2k], [2k+1] for k = 1..n: the buyer's user id and the order id to use if
                 the buyer wins (unique, minted by the gateway)
ARGV[2n+1+k]     optional, for k = 1..n, only while the gateway exports traces:
                 the buyer's W3C traceparent (empty: none). Absent, the
                 script does exactly what it did without them.

Returns an array of n integers, one per buyer, in order (named in Rust as
`stock::lua::codes::purchase`):
  1  bought: the unit is taken and the order is in the stream (also for a
     replayed call whose order id was accepted before: nothing is taken again)
  0  sold out
  2  already purchased: the buyer has reached per-user limit
  3  not started      4  ended
  5  unknown: the promotion's meta is not loaded: missing (never preheated,
     deleted, or lost by Redis) or without `starts_ms` (only counters, as on
     a replica that missed the preheat); recovery rebuilds it

Stream entry fields: order_id, promotion_id, user_id, seq (the buyer's n-th
unit, 1-based), price_cents, created_ms, and traceparent only when the
buyer's traceparent was given and is not empty.

Invariants (each has a test):
  - stock never goes below zero: a unit is taken only while stock > 0;
  - a buyer's count never exceeds limit, and the limit is checked before the
    stock, so a repeat buyer never burns a unit, and a buyer is counted only
    when a unit is taken;
  - stock, the buyer's count, sold, the result and the stream entry change
    together or not at all (a script runs atomically);
  - stock + sold - returned = initial stock, always;
  - time is Redis's own clock, the one every gateway shares;
  - an order id is accepted at most once: a call replayed after a lost reply
    answers "bought" for the orders it already took and takes nothing twice
    (the `won` hash also tells pay and cancel whose order is on its way).
]]

local n = tonumber(ARGV[1])
local out = {}
-- Trace contexts follow the buyers only while traces are exported.
local traced = #ARGV > 2 * n + 1

local meta = redis.call('HMGET', KEYS[1], 'id', 'starts_ms', 'ends_ms', 'limit', 'price_cents')
-- Loaded: preheat or recover wrote the meta, `starts_ms` with it. A hash
-- without it (missing, or holding only counters) is not loaded.
if not meta[2] then
  for i = 1, n do out[i] = 5 end
  return out
end
local promotion_id = meta[1]
local starts_ms = tonumber(meta[2])
local ends_ms = tonumber(meta[3])
local limit = tonumber(meta[4])
local price_cents = meta[5]

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- 0: the window is open; else the code every new order of this call gets.
local closed = 0
if now_ms < starts_ms then
  closed = 3
elseif now_ms >= ends_ms then
  closed = 4
end

local stock = tonumber(redis.call('GET', KEYS[2]) or '0')

-- What every buyer of the call changes in the same key is written once, after
-- the loop: the stock, `sold`, and the results and won hashes. Per buyer
-- stay only what the next buyer of the same call must see (the buyer's count,
-- the won hash through `accepted`) and the stream entry.
local taken = 0
local results = {}
local won = {}
local accepted = {}

for i = 1, n do
  local user_id = ARGV[2 * i]
  local order_id = ARGV[2 * i + 1]
  if accepted[order_id] or redis.call('HEXISTS', KEYS[6], order_id) == 1 then
    out[i] = 1
  elseif closed ~= 0 then
    out[i] = closed
  else
    local bought = tonumber(redis.call('HGET', KEYS[3], user_id) or '0')
    if bought >= limit then
      out[i] = 2
    elseif stock <= 0 then
      out[i] = 0
    else
      stock = stock - 1
      taken = taken + 1
      accepted[order_id] = true
      local seq = redis.call('HINCRBY', KEYS[3], user_id, 1)
      results[#results + 1] = user_id
      results[#results + 1] = order_id
      won[#won + 1] = order_id
      won[#won + 1] = user_id
      local traceparent = traced and ARGV[2 * n + 1 + i] or ''
      if traceparent == '' then
        redis.call('XADD', KEYS[4], '*',
          'order_id', order_id,
          'promotion_id', promotion_id,
          'user_id', user_id,
          'seq', seq,
          'price_cents', price_cents,
          'created_ms', now_ms)
      else
        redis.call('XADD', KEYS[4], '*',
          'order_id', order_id,
          'promotion_id', promotion_id,
          'user_id', user_id,
          'seq', seq,
          'price_cents', price_cents,
          'created_ms', now_ms,
          'traceparent', traceparent)
      end
      out[i] = 1
    end
  end
end

-- HSET of many pairs, in slices that stay far below Lua's argument limit
-- whatever the batch size.
local function hset_all(key, pairs)
  for first = 1, #pairs, 200 do
    redis.call('HSET', key, unpack(pairs, first, math.min(first + 199, #pairs)))
  end
end

if taken > 0 then
  redis.call('DECRBY', KEYS[2], taken)
  redis.call('HINCRBY', KEYS[1], 'sold', taken)
  hset_all(KEYS[5], results)
  hset_all(KEYS[6], won)
end

return out
