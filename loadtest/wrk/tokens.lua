-- loadtest/wrk/tokens.lua: wrk requests, each from the next distinct buyer.
--
--   wrk -t1 -c50 -d10s -s loadtest/wrk/tokens.lua URL -- METHOD PATH TOKENS.csv [THREADS]
--
-- TOKENS.csv holds `user_id,token` lines (`seckill tokens --users N`; a
-- header line is skipped). Request k carries the JWT of line k, so no two
-- requests share a buyer while the file lasts; when it runs out the thread
-- stops (fewer requests than the duration allows: size the file generously).
-- With THREADS wrk threads (-t), thread t takes lines t, t+T, t+2T, ...
-- TOKENS.csv "-" sends METHOD PATH without a token (e.g. GET /health), so a
-- plain route is measured through the same script.
--
-- Every request is built in init(), before wrk starts its clock, and the
-- script defines no response() callback: per-request garbage with a large
-- live heap (hundreds of thousands of tokens) sends LuaJIT's collector into
-- long full cycles, and wrk then measured itself (3k req/s at 100% CPU while
-- the gateway idled). Statuses are counted by the gateway (/metrics) instead.
--
-- At the end it prints "latency_us p50 p90 p99 p999 max" (wrk's histogram)
-- and "requests N duration_us D errors connect read write status timeout"
-- for loadtest/bench.sh.

local threads = {}
local counter = 1

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- LuaJIT (2.1, as Debian builds it) hashes a string from four 4-byte samples:
-- its start, its end, len/4 and len/2. Requests that differ only in a JWT
-- would all share one hash when none of those samples falls inside the token
-- (which depends on header order, random in wrk.format): interning each new
-- string then walks one ever longer chain, and loading took from 2 s to
-- forever. So the request is laid out by hand, with a padding header that
-- puts the len/2 sample inside the token's signature.
local function buyer_request(method, host, path, token, body)
  local head = method .. " " .. path .. " HTTP/1.1\r\nHost: " .. host ..
    "\r\nAuthorization: Bearer " .. token
  local tail = "\r\nContent-Type: application/json\r\nContent-Length: " ..
    #(body or "") .. "\r\n\r\n" .. (body or "")
  local pad_header = "\r\nX-Pad: "
  -- 0-based start of the len/2 sample: (len >> 1) - 2; aim 20 bytes before
  -- the token's end.
  local want_len = 2 * (#head - 20 + 2)
  local pad = want_len - #head - #pad_header - #tail
  if pad < 1 then pad = 1 end
  return head .. pad_header .. string.rep("p", pad) .. tail
end

function init(args)
  local method = args[1] or "GET"
  local path = args[2] or "/"
  local file = args[3] or "-"
  local nthreads = tonumber(args[4] or "1")
  local body = (method == "POST") and "{}" or nil
  local host = wrk.headers["Host"] or (wrk.host .. ":" .. tostring(wrk.port))
  requests = {}
  local n = 0
  if file ~= "-" then
    local i = 0
    for line in io.lines(file) do
      local comma = line:find(",", 1, true)
      if comma and line:sub(1, comma - 1) ~= "user_id" then
        if i % nthreads == tid then
          n = n + 1
          requests[n] = buyer_request(method, host, path, line:sub(comma + 1), body)
        end
        i = i + 1
      end
    end
  end
  nrequests = n
  plain = wrk.format(method, path, { ["Content-Type"] = "application/json" }, body)
  collectgarbage("collect")
  -- request() allocates nothing from here on: no collector, no pauses.
  collectgarbage("stop")
end

function request()
  if nrequests == 0 then
    return plain
  end
  local r = requests[counter]
  if r == nil then
    wrk.thread:stop()
    return requests[nrequests]
  end
  counter = counter + 1
  return r
end

function done(summary, latency, requests)
  io.write(string.format("latency_us %d %d %d %d %d\n", latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
  io.write(string.format("requests %d duration_us %d errors %d %d %d %d %d\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout))
end
