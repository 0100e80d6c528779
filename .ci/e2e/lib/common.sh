# Shared by the end-to-end scripts and bench/soak.sh (sourced, not run): a scratch directory,
# cleanup of every process a script starts, counted checks with one summary line, and small
# loopback helpers. The sourcing script defines `say`.
# shellcheck shell=bash

# Creates $WORK and arms the cleanup. Scripts append the PIDs they start to PIDS; until
# e2e_finish passes, an exit counts as a failure and the logs are shown. E2E_KEEP=1 keeps
# $WORK.
e2e_setup() {
  E2E_NAME=$1
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/tokengate-$1.XXXXXX")
  PIDS=()
  FAILED=1
  PASSED=0
  FAILURES=()
  trap e2e_cleanup EXIT
}

# check "description" <command...>: counted, and reported together by e2e_finish.
check() {
  local what=$1; shift
  if "$@"; then PASSED=$((PASSED + 1)); say "ok    $what"
  else FAILURES+=("$what"); say "FAIL  $what"; fi
}

# The summary; its last line `NAME: N passed, M failed` is what CI reads. Exits 1 on a
# failed check, and otherwise disarms the failure report of the cleanup.
e2e_finish() {
  if ((${#FAILURES[@]})); then
    say "FAIL: ${#FAILURES[@]} check(s) failed:"
    printf '[%s]   - %s\n' "$E2E_NAME" "${FAILURES[@]}"
    echo "$E2E_NAME: $PASSED passed, ${#FAILURES[@]} failed"
    exit 1
  fi
  FAILED=0
  say "PASS"
  echo "$E2E_NAME: $PASSED passed, 0 failed"
}

e2e_cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    # Bounded: a process that ignores SIGTERM gets SIGKILL after ~2 s.
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ $FAILED == 1 ]]; then
    local log
    for log in "$WORK"/*.log; do
      [[ -s $log ]] || continue
      printf '\n----- %s (last 40 lines) -----\n' "$(basename "$log")" >&2
      tail -n 40 "$log" >&2
    done
  fi
  if [[ ${E2E_KEEP:-0} == 1 ]]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}

# Direct to loopback, never through a proxy from the environment, always time-bounded.
hcurl() { curl --silent --show-error --noproxy '*' --max-time 5 "$@"; }

# Evaluates a JS expression over a JSON file: `json FILE 'o.issued["x"] ?? 0'`.
json() {
  node -e '
    const o = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    const v = new Function("o", "return (" + process.argv[2] + ");")(o);
    console.log(typeof v === "object" ? JSON.stringify(v) : String(v));
  ' "$1" "$2"
}

# N currently free loopback ports, held open together so they are distinct.
free_ports() {
  node -e '
    const net = require("net");
    const servers = Array.from({ length: +process.argv[1] }, () => net.createServer());
    Promise.all(servers.map((s) => new Promise((ok) => s.listen(0, "127.0.0.1", ok))))
      .then(() => { console.log(servers.map((s) => s.address().port).join(" "));
                    servers.forEach((s) => s.close()); });
  ' "$1"
}
