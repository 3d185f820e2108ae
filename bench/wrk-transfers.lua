-- wrk driving POST /v1/transfers the way `ledger bench --workload transfers` does: a unique Idempotency-Key per
-- request, a random pair out of the funded accounts bench-0 .. bench-(N-1), 1 USD each. A second load generator,
-- not ours, so that a number cannot come from a flaw of our own client.
--
--   wrk -t 2 -c 16 -d 10s --latency -s bench/wrk-transfers.lua http://127.0.0.1:8080 -- TOKEN [ACCOUNTS] [RUN]
--
-- Every answer other than 201 is counted and printed at the end (wrk itself counts only statuses >= 400).

local token, accounts, run
local counter = 0
local threads = {}

function setup(thread)
   thread:set("thread_id", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   token = args[1] or error("usage: wrk ... -s bench/wrk-transfers.lua URL -- TOKEN [ACCOUNTS] [RUN]")
   accounts = tonumber(args[2] or "10000")
   run = args[3] or tostring(os.time())
   math.randomseed(os.time() * 1000 + thread_id)  -- thread_id: set by setup() for this thread
   unexpected = 0
end

function request()
   counter = counter + 1
   local a = math.random(0, accounts - 1)
   local b = math.random(0, accounts - 2)
   if b >= a then b = b + 1 end
   local body = '{"from":"bench-' .. a .. '","to":"bench-' .. b .. '","amount":1,"currency":"USD"}'
   return wrk.format("POST", "/v1/transfers", {
      ["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = "wrk-" .. run .. "-" .. thread_id .. "-" .. counter,
   }, body)
end

function response(status, headers, body)
   if status ~= 201 then unexpected = unexpected + 1 end
end

function done(summary, latency, requests)
   local total = 0
   for _, thread in ipairs(threads) do total = total + thread:get("unexpected") end
   io.write(string.format("wrk transfers: rate=%.0f/s p50=%.1fms p99=%.1fms requests=%d not_201=%d socket_errors=%d\n",
      summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
      summary.requests, total, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout))
end
