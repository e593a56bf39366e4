-- etcd v3 JSON gateway read of one key: POST /v3/kv/range {"key": BENCH_READ_KEY_B64}.
-- No "serializable" field, so etcd's default applies: a linearizable read (ReadIndex).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "common.lua")
setup = common.setup
done = common.done

local key = os.getenv("BENCH_READ_KEY_B64") or "cmVhZGtleQ=="
wrk.method = "POST"
wrk.path = "/v3/kv/range"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"key":"' .. key .. '"}'
