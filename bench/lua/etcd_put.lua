-- etcd v3 JSON gateway put: POST /v3/kv/put {"key": <b64>, "value": <b64>}.
-- Keys are sequential per wrk thread: BENCH_PREFIX (4 base64 chars = 3 key bytes) followed by
-- the 2-digit thread id and a 10-digit counter; 16 base64 chars decode to a 12-byte key.
-- BENCH_VALUE_B64 is the value (the caller encodes 256 bytes, the same bytes meshnode gets).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "common.lua")
setup = common.setup
done = common.done

local prefix = os.getenv("BENCH_PREFIX") or "r00a"
local value = os.getenv("BENCH_VALUE_B64") or string.rep("A", 342) .. "=="
local headers = { ["Content-Type"] = "application/json" }
local counter = 0

request = function()
  counter = counter + 1
  local key = prefix .. string.format("%02d%010d", tid, counter)
  local body = '{"key":"' .. key .. '","value":"' .. value .. '"}'
  return wrk.format("POST", "/v3/kv/put", headers, body)
end
