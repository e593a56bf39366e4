-- meshnode (Consul KV shape) put: PUT /v1/kv/bench/<BENCH_PREFIX>/<tid><counter>, raw body.
-- Keys are sequential per wrk thread like etcd_put.lua; the value is BENCH_VALUE_SIZE (256)
-- bytes, the same size etcd gets.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "common.lua")
setup = common.setup
done = common.done

local prefix = os.getenv("BENCH_PREFIX") or "r00a"
local value = string.rep("v", tonumber(os.getenv("BENCH_VALUE_SIZE") or "256"))
local path = "/v1/kv/bench/" .. prefix .. "/"
local counter = 0

request = function()
  counter = counter + 1
  return wrk.format("PUT", path .. string.format("%02d%010d", tid, counter), nil, value)
end
