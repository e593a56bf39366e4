-- Shared by the bench/lua scripts (each loads it with dofile from its own directory).
-- Everything is configured through environment variables so that the scripts stay fixed
-- files and bench/raft_vs_etcd.py only sets the environment of the wrk process.
--
--   BENCH_TARGETS  "ip:port,ip:port,..."  when set, wrk thread k connects to entry
--                  ((k-1) mod n) + 1 instead of the URL's host (wrk's thread.addr); this is
--                  how one wrk run spreads its connections over the members of a cluster.
--
-- done() prints one line "BENCH_RESULT {json}" with exact figures (latencies in us), so the
-- caller does not have to parse wrk's rounded human-readable summary.

local M = {}

local targets = nil
local nthreads = 0

function M.setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
  local spec = os.getenv("BENCH_TARGETS")
  if spec == nil or spec == "" then
    return
  end
  if targets == nil then
    targets = {}
    for hostport in string.gmatch(spec, "[^,]+") do
      local host, port = string.match(hostport, "^(.+):(%d+)$")
      local addrs = wrk.lookup(host, port)
      targets[#targets + 1] = addrs[1]
    end
  end
  thread.addr = targets[(nthreads - 1) % #targets + 1]
end

function M.done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d},"threads":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), nthreads))
end

return M
