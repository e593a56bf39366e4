-- meshnode linearizable read of one key: GET /v1/kv/<BENCH_READ_KEY>?consistent (ReadIndex).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "common.lua")
setup = common.setup
done = common.done

local key = os.getenv("BENCH_READ_KEY") or "bench/read"
wrk.method = "GET"
wrk.path = "/v1/kv/" .. key .. "?consistent"
