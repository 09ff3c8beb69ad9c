-- Requests for `make bench`, sent by wrk (LuaJIT). Every configuration gets exactly this
-- mix, so the rows differ only in what Envoy does with it.
--
-- 1,000 requests are built once in init() and sent in turn, so wrk spends no time per
-- request building them. The mix exercises every path of the bench policy
-- (tests/src/bin/meshcanary-bench/setups.rs); request i (0-based) is:
--   i % 20 == 0        x-canary: always                 -> rule "qa"        (5 %)
--   i % 20 in {1, 2}   cookie ... plan=beta ...          -> rule "beta"      (10 %)
--   i % 20 == 3        x-user-id: staff-<i>             -> rule "staff"     (5 %)
--   i % 20 == 4        no x-user-id                     -> split, key missing: random draw (5 %)
--   otherwise          x-user-id: user-<(i*7919) % 100000> -> sticky split  (75 %)
-- micro.rs builds the same mix for the native decision benchmark; keep them in step.

local requests = {}
local sent = 0

function init(args)
    for i = 0, 999 do
        local kind = i % 20
        local plan = "free"
        if kind == 1 or kind == 2 then
            plan = "beta"
        end
        local headers = {
            ["User-Agent"] = "meshcanary-bench",
            ["Accept"] = "application/json",
            ["Cookie"] = string.format("session=%06d; plan=%s; theme=dark", (i * 7907) % 1000000, plan),
        }
        if kind == 0 then
            headers["X-Canary"] = "always"
        end
        if kind == 3 then
            headers["X-User-Id"] = "staff-" .. i
        elseif kind ~= 4 then
            headers["X-User-Id"] = "user-" .. ((i * 7919) % 100000)
        end
        requests[#requests + 1] = wrk.format("GET", "/shop/cart?item=" .. i, headers)
    end
end

function request()
    sent = sent % #requests + 1
    return requests[sent]
end

-- One machine-readable line for the harness (latencies in microseconds).
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'meshcanary-bench {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,'
            .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
        summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
        latency:percentile(50), latency:percentile(99), latency.max))
end
