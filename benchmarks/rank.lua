-- wrk script for POST /rank with pre-built bodies.
--   wrk -t1 -c1 -d10s --latency -s benchmarks/rank.lua http://127.0.0.1:8000 -- bodies.jsonl [path]
-- bodies.jsonl holds one JSON request body per line. Each wrk thread formats every request once
-- in init(), so request() only hands back a pre-built string: the client does almost no work
-- per request. done() prints the latency distribution as one JSON line prefixed with WRK_JSON.

local prebuilt = {}
local nxt = 0
local threads_seen = 0

function setup(thread)
  -- runs in the main state, once per thread: give each thread its own starting body
  thread:set("offset", threads_seen * 7)
  threads_seen = threads_seen + 1
end

function init(args)
  local path = args[1]
  local target = args[2] or "/rank"
  local headers = { ["Content-Type"] = "application/json" }
  for line in io.lines(path) do
    if #line > 0 then
      prebuilt[#prebuilt + 1] = wrk.format("POST", target, headers, line)
    end
  end
  if #prebuilt == 0 then
    error("no request bodies in " .. path)
  end
  nxt = (offset or 0) % #prebuilt
end

function request()
  nxt = nxt % #prebuilt + 1
  return prebuilt[nxt]
end

function done(summary, latency, requests)
  local e = summary.errors
  local fmt = 'WRK_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,'
    .. '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},'
    .. '"latency_us":{"min":%.1f,"max":%.1f,"mean":%.1f,"stdev":%.1f,'
    .. '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f}}\n'
  io.write(string.format(fmt,
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
