--[[
restock.lua: give the unit of a cancelled or expired order back to the sale,
once per order, whatever the number of calls.

KEYS[1]  {P:p:ID}:meta      hash (see purchase.lua); `returned` is counted here
KEYS[2]  {P:p:ID}:stock     string  units left on sale
KEYS[3]  {P:p:ID}:returned  set  ids of the orders whose unit came back

ARGV[1]  the order id

Returns (named in Rust as `stock::lua::codes::restock`):
   1  the unit is back on sale
   0  this order's unit was already returned (a retried or concurrent cancel)
  -1  Redis has no state for the promotion; nothing changed (`seckill
      recover` rebuilds the state from PostgreSQL, counting cancelled orders)

Invariants:
  - an order returns at most one unit: the SADD and the INCR happen together
    or not at all;
  - stock + sold - returned = initial stock still holds afterwards;
  - the buyer's count is not given back (API.md): a buyer who cancelled
    cannot buy again past the per-user limit.
]]

if redis.call('HEXISTS', KEYS[1], 'starts_ms') == 0 then
  return -1
end
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then
  return 0
end
redis.call('INCR', KEYS[2])
redis.call('HINCRBY', KEYS[1], 'returned', 1)
return 1
