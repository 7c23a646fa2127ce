-- wrk's side of the reads scenario: each request is one node's status read with its user's
-- token, taken in turn from the file hive-bench wrote before the clock started (one
-- "path token" pair a line). Each of wrk's threads starts at a different place in the list.

local targets = {}
local next_target = 1
local threads = 0

-- Runs in wrk's main state, once a thread: numbers the threads.
function setup(thread)
  thread:set("offset", threads)
  threads = threads + 1
end

function init(args)
  for line in io.lines(args[1]) do
    local path, token = line:match("^(%S+) (%S+)$")
    if path then
      targets[#targets + 1] = { path, "Bearer " .. token }
    end
  end
  next_target = (tonumber(offset) or 0) * 7919 % #targets + 1
end

function request()
  local target = targets[next_target]
  next_target = next_target % #targets + 1
  return wrk.format("GET", target[1], { ["Authorization"] = target[2] })
end

-- Two lines hive-bench reads: what was done and how long it took, in microseconds; then the
-- latency histogram (each distinct latency and how many answers took it), so that slices of a
-- run combine into exact percentiles.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "hive-bench: requests=%d duration_us=%d non2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout))
  local histogram = {}
  for i = 1, #latency do
    local us, count = latency(i)
    histogram[#histogram + 1] = string.format("%d:%d", us, count)
  end
  io.write("hive-bench latency: " .. table.concat(histogram, " ") .. "\n")
end
