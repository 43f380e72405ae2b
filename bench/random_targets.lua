-- wrk script used by bench/loadgen.py: every request is a random line of the targets file
-- (path, then header name and value pairs, tab-separated), given after `--` on wrk's command line.
-- done() prints the figures as one JSON line for the benchmark to read.

local targets = {}

function init(args)
  for line in io.lines(args[1]) do
    local fields = {}
    for field in (line .. "\t"):gmatch("([^\t]*)\t") do
      fields[#fields + 1] = field
    end
    local headers = {}
    for i = 2, #fields - 1, 2 do
      headers[fields[i]] = fields[i + 1]
    end
    targets[#targets + 1] = {fields[1], headers}
  end
  math.randomseed(os.time())
end

function request()
  local target = targets[math.random(#targets)]
  return wrk.format("GET", target[1], target[2])
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
