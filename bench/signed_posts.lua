-- wrk script used by bench/webhook_intake.py --client wrk: POSTs Intuit notifications from a
-- file of `signature<TAB>body` lines, in turn; with a rate given after the file, each connection
-- waits connections / rate seconds between its requests (paced, not open loop).
-- done() prints the figures as one JSON line for the benchmark to read.

local requests = {}
local index = 0
local pause_ms = 0

function init(args)
  for line in io.lines(args[1]) do
    local signature, body = line:match("^([^\t]+)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", "/intuit/webhooks",
      {["Content-Type"] = "application/json", ["intuit-signature"] = signature}, body)
  end
  if args[2] then pause_ms = tonumber(args[2]) end
end

function delay()
  return pause_ms
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_s": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, ' ..
    '"max_ms": %.3f, "non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, e.status,
    e.connect + e.read + e.write + e.timeout))
end
