-- rank.lua plus a count of responses by status, for the overload rows (answers and sheds apart):
--   wrk -t2 -c512 -d10s --timeout 2s -s benchmarks/rank_status.lua URL -- bodies.jsonl [path]
-- Defining response() makes wrk hand every response to Lua, which costs the client a little per
-- response, so the latency and throughput rows use rank.lua alone. done() prints rank.lua's
-- WRK_JSON line, then WRK_STATUS {"200":n,"503":n,"other":n}.

local dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(dir .. "rank.lua")

local base_setup, base_done = setup, done
local threads = {}
ok, shed, other = 0, 0, 0

function setup(thread)
  base_setup(thread)
  threads[#threads + 1] = thread
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
  elseif status == 503 then
    shed = shed + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  base_done(summary, latency, requests)
  local n = { 0, 0, 0 }
  for _, t in ipairs(threads) do
    n[1], n[2], n[3] = n[1] + t:get("ok"), n[2] + t:get("shed"), n[3] + t:get("other")
  end
  io.write(string.format('WRK_STATUS {"200":%d,"503":%d,"other":%d}\n', n[1], n[2], n[3]))
end
