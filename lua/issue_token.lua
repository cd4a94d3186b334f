--[[
issue_token.lua: admit one more buyer to a promotion that requires admission
tokens, within the promotion's cap.

The cap (a multiple of the stock) bounds how many distinct buyers can ever
reach the purchase script, so most of a bot swarm is turned away here. The
gateway signs the token itself (HMAC); this script only counts.

KEYS[1]  {P:p:ID}:meta     hash (see purchase.lua)
KEYS[2]  {P:p:ID}:stock    string  units left on sale
KEYS[3]  {P:p:ID}:tokens   hash  user id -> 1, the buyers admitted so far

ARGV[1]  user id
ARGV[2]  cap multiple: at most stock (initial) * multiple buyers are admitted
ARGV[3]  optional: 1 when the promotion is split into buckets; KEYS are then
         bucket 0's, whose stock is only one bucket's, so "nothing left on
         sale" is not checked here (the cap still is; the purchase decides)

Returns (named in Rust as `stock::lua::codes::issue_token`):
  1  admitted now          2  admitted before (a fresh token, no new seat)
  0  refused: the cap is reached or nothing is left on sale
  3  not started           4  ended
  5  unknown promotion (no state in Redis: meta missing or without starts_ms)

Invariants:
  - HLEN tokens never exceeds stock * multiple;
  - a buyer admitted once is never refused a new token for the cap.
]]

if redis.call('HEXISTS', KEYS[1], 'starts_ms') == 0 then
  return 5
end
local meta = redis.call('HMGET', KEYS[1], 'starts_ms', 'ends_ms', 'stock')
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now_ms < tonumber(meta[1]) then
  return 3
end
if now_ms >= tonumber(meta[2]) then
  return 4
end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 2
end
if ARGV[3] ~= '1' and tonumber(redis.call('GET', KEYS[2]) or '0') <= 0 then
  return 0
end
if redis.call('HLEN', KEYS[3]) >= tonumber(meta[3]) * tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], 1)
return 1
