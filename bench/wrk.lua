-- wrk script for bench/run.sh.
--
-- With BENCH_BODY_FILE set, every request is a POST of that file's content (the 64 KiB
-- upload); without it, wrk's default GET. At the end it prints one machine-readable line
-- that run.sh parses; wrk's own report (with --latency) is kept in the run's log.
--
-- errors.status is wrk's count of responses with a status >= 400; the benchmark's upstream
-- answers only 200, so it is the non-2xx count here.

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file ~= nil and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(99)),
    e.connect, e.read, e.write, e.status, e.timeout))
end
