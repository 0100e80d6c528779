#!/usr/bin/env bash
# End-to-end check of tokengate's metrics with a real Prometheus server.
#
#   curl ──http──▶ tokengate ──http + Bearer──▶ standin (token endpoint + API)
#                      ▲ /metrics every 1 s
#                  prometheus (Debian's package, started by hand on loopback) ◀── curl /api/v1/query
#
# Installs Debian's `prometheus` package when `prometheus` is not on PATH (without starting
# it as a service), starts the stand-in Delivery Hub (examples/standin.rs), tokengate with a
# scratch config, and Prometheus with a scratch config that scrapes tokengate's admin port
# every second and loads the example alerting rules (prometheus-alerts.yml, the README's).
# Sends traffic through tokengate (200s and upstream 503s), then asks Prometheus's HTTP API
# until `up` and `tokengate_token_valid` are 1 and the traffic is counted, evaluates every
# alert's expression without its threshold (each must return data), checks that every rule
# evaluates cleanly and that the 5xx alert is pending, and that tokengate exits 0 on SIGTERM.
#
# Fleet mode, beside it: a redis-server of its own (Debian's, installed by
# .ci/install-redis-server.sh when missing) on a free loopback port, two tokengate members
# sharing it (integration "fleet": one token request between them, one generation, an
# adoption; every tokengate_fleet_* series there from the start) and one whose Redis is
# unreachable (redis://127.0.0.1:1, integration "fleet_down": redis_up 0, the same series,
# a token fetched alone, TokengateFleetRedisDown pending). The fleet alerts and the dashboard's
# Fleet row are evaluated against them. While the binary predates fleet mode (it rejects
# [fleet] as an unknown key), this part and the queries that need it say SKIP.
#
# Usage: .ci/e2e/prometheus.sh     (root or an installed prometheus; curl, python3, cargo)
#   TOKENGATE_BIN  tokengate binary (default: <repo>/target/release/tokengate)
#   STANDIN_BIN    stand-in binary (default: built with cargo build --release --example standin)
#   E2E_KEEP       =1: keep the work directory (configs, logs, TSDB) after the run
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)   # this file lives at <repo>/.ci/e2e/prometheus.sh
TOKENGATE_BIN=${TOKENGATE_BIN:-$REPO_ROOT/target/release/tokengate}
RULES=$HERE/prometheus-alerts.yml
README=$REPO_ROOT/README.md

READY_WAIT=30   # seconds for each process to come up
QUERY_WAIT=40   # seconds for Prometheus to show what was scraped
STOP_WAIT=10    # seconds for a process to exit after SIGTERM
APT_WAIT=600    # seconds for apt-get update + install

PASSED=0
FAILED=0
PIDS=()
say() { printf '[prometheus-e2e] %s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); say "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); say "FAIL: $*" >&2; }
die() { fail "$*"; exit 1; }

for tool in curl python3; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH"
done
[[ -x $TOKENGATE_BIN ]] ||
  die "no tokengate binary at $TOKENGATE_BIN (cargo build --release, or set TOKENGATE_BIN)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tokengate-prometheus-e2e.XXXXXX")
POLICY_GUARD=""

cleanup() {
  local status=$? pid
  [[ -z $POLICY_GUARD ]] || rm -f "$POLICY_GUARD"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    # Bounded: a process that ignores SIGTERM gets SIGKILL after ~2 s.
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ $FAILED != 0 || $status != 0 ]]; then
    local log
    for log in "$WORK"/*.log; do
      [[ -s $log ]] || continue
      printf '\n----- %s (last 30 lines) -----\n' "$(basename "$log")" >&2
      tail -n 30 "$log" >&2
    done
  fi
  if [[ ${E2E_KEEP:-0} == 1 ]]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  if [[ $status != 0 && $FAILED == 0 ]]; then FAILED=1; fi
  echo "prometheus-e2e: $PASSED passed, $FAILED failed"
  if [[ $FAILED != 0 ]]; then exit 1; fi
}
trap cleanup EXIT

# Runs "$@" until it succeeds, for at most $1 seconds; fails (returns 1) after that.
wait_until() {
  local limit=$1 deadline
  shift
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.25
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

http_status() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" || true; }
is_200() { [[ $(http_status "$1") == 200 ]]; }

# ---- Prometheus, from Debian, never as a service ----
if ! command -v prometheus >/dev/null; then
  [[ $(id -u) == 0 ]] || die "prometheus is not on PATH, and installing Debian's package needs root"
  say "installing Debian's prometheus package (apt-get; it is not started as a service)"
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    # invoke-rc.d asks this before starting a service; 101 means "not now".
    POLICY_GUARD=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_GUARD"
    chmod 755 "$POLICY_GUARD"
  fi
  if ! timeout "$APT_WAIT" bash -c 'apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus' \
      >"$WORK/apt.log" 2>&1; then
    die "apt-get install prometheus failed (see apt.log)"
  fi
  if [[ -n $POLICY_GUARD ]]; then rm -f "$POLICY_GUARD"; POLICY_GUARD=""; fi
fi
command -v prometheus >/dev/null || die "prometheus is still not on PATH"
pass "prometheus available: $(prometheus --version 2>&1 | head -n 1)"
if command -v promtool >/dev/null; then
  if promtool check rules "$RULES" >"$WORK/promtool.log" 2>&1; then
    pass "promtool accepts the alerting rules"
  else
    fail "promtool rejects $RULES (see promtool.log)"
  fi
fi

# ---- the stand-in Delivery Hub ----
if [[ -z ${STANDIN_BIN:-} ]]; then
  say "building the stand-in (cargo build --release --example standin)"
  (cd "$REPO_ROOT" && cargo build --release --locked --quiet --example standin) >"$WORK/build.log" 2>&1 ||
    die "cannot build examples/standin.rs (see build.log)"
  STANDIN_BIN=$REPO_ROOT/target/release/examples/standin
fi
"$STANDIN_BIN" --port 0 --lifetime-secs 3600 >"$WORK/standin.out" 2>"$WORK/standin.log" &
PIDS+=("$!")
wait_until "$READY_WAIT" test -s "$WORK/standin.out" || die "the stand-in printed no address"
HUB=$(head -n 1 "$WORK/standin.out")
[[ $HUB == http://127.0.0.1:* ]] || die "the stand-in printed $HUB, not its base URL"
pass "stand-in Delivery Hub at $HUB"

# ---- tokengate ----
ADMIN_PORT=$(free_port)
LISTEN_PORT=$(free_port)
printf 'e2e-secret-%s\n' "$RANDOM$RANDOM" >"$WORK/client_secret"
cat >"$WORK/tokengate.toml" <<EOF
[server]
admin_listen = "127.0.0.1:$ADMIN_PORT"
log_format = "json"
shutdown_grace = "5s"

[[integration]]
name = "e2e"
listen = "127.0.0.1:$LISTEN_PORT"
token_url = "$HUB/oauth/token"
upstream = "$HUB"
client_id = "e2e-client"
client_secret = { file = "$WORK/client_secret" }
EOF
TOKENGATE_LOG=info "$TOKENGATE_BIN" --config "$WORK/tokengate.toml" 2>"$WORK/tokengate.log" &
TOKENGATE_PID=$!
PIDS+=("$TOKENGATE_PID")
ADMIN=http://127.0.0.1:$ADMIN_PORT
PROXY=http://127.0.0.1:$LISTEN_PORT
wait_until "$READY_WAIT" is_200 "$ADMIN/readyz" || die "tokengate not ready within ${READY_WAIT}s"
pass "tokengate ready ($ADMIN/readyz)"

# ---- fleet mode: two members sharing a redis-server, one that cannot reach Redis ----
# fleet_config ADMIN_PORT LISTEN_PORT INTEGRATION REDIS_URL: a member's configuration.
fleet_config() {
  cat <<EOF
[server]
admin_listen = "127.0.0.1:$1"
log_format = "json"
shutdown_grace = "5s"

[fleet]
redis_url = "$4"
wait_for_peer = "3s"
on_unavailable = "fetch_locally"

[[integration]]
name = "$3"
listen = "127.0.0.1:$2"
token_url = "$HUB/oauth/token"
upstream = "$HUB"
client_id = "e2e-fleet-client"
client_secret = { file = "$WORK/fleet_client_secret" }
EOF
}
# start_member NAME INTEGRATION REDIS_URL: starts it and sets ${NAME}_ADMIN (its admin address).
start_member() {
  local name=$1 admin listen
  admin=$(free_port)
  listen=$(free_port)
  fleet_config "$admin" "$listen" "$2" "$3" >"$WORK/$name.toml"
  TOKENGATE_LOG=info "$TOKENGATE_BIN" --config "$WORK/$name.toml" 2>"$WORK/$name.log" &
  PIDS+=("$!")
  printf -v "${name}_ADMIN" '127.0.0.1:%s' "$admin"
  if wait_until "$READY_WAIT" is_200 "http://127.0.0.1:$admin/readyz"; then
    pass "fleet member $name ($2, Redis $3) ready"
  else
    fail "fleet member $name ($2, Redis $3) not ready within ${READY_WAIT}s"
  fi
}
redis_ping() {
  python3 -c '
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
' "$1"
}

FLEET=0
FLEET_TARGETS=""
printf 'e2e-fleet-secret-%s\n' "$RANDOM$RANDOM" >"$WORK/fleet_client_secret"
fleet_config "$(free_port)" "$(free_port)" probe "redis://127.0.0.1:1" >"$WORK/fleet-probe.toml"
"$TOKENGATE_BIN" check --config "$WORK/fleet-probe.toml" >"$WORK/fleet-probe.out" 2>&1 || true
if grep -q 'unknown key .fleet.' "$WORK/fleet-probe.out"; then
  say "SKIP: fleet mode: this tokengate predates it ($(head -n 1 "$WORK/fleet-probe.out"))"
else
  FLEET=1
  bash "$REPO_ROOT/.ci/install-redis-server.sh" >"$WORK/redis-install.log" 2>&1 ||
    die "cannot install redis-server: $(tail -n 3 "$WORK/redis-install.log")"
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
  PIDS+=("$!")
  wait_until "$READY_WAIT" redis_ping "$REDIS_PORT" || die "redis-server not answering PING within ${READY_WAIT}s"
  pass "redis-server at 127.0.0.1:$REDIS_PORT"
  # A first, then B once A holds the token: B must adopt it, not fetch.
  start_member A fleet "redis://127.0.0.1:$REDIS_PORT"
  start_member B fleet "redis://127.0.0.1:$REDIS_PORT"
  start_member C fleet_down "redis://127.0.0.1:1"
  FLEET_TARGETS=", \"$A_ADMIN\", \"$B_ADMIN\", \"$C_ADMIN\""
fi

# ---- Prometheus, by hand, on loopback ----
PROM_PORT=$(free_port)
PROM=http://127.0.0.1:$PROM_PORT
cp "$RULES" "$WORK/alerts.yml"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $WORK/alerts.yml
scrape_configs:
  - job_name: tokengate
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"$FLEET_TARGETS]
EOF
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=("$!")
wait_until "$READY_WAIT" is_200 "$PROM/-/ready" || die "Prometheus not ready within ${READY_WAIT}s"
pass "Prometheus serving at $PROM"

# The first sample's value of an instant query ("" when there is none); fails on an API error.
query() {
  curl -fsS --max-time 5 --get --data-urlencode "query=$1" "$PROM/api/v1/query" |
    python3 -c '
import json, sys
reply = json.load(sys.stdin)
if reply.get("status") != "success":
    sys.exit("query failed: %s" % reply)
result = reply["data"]["result"]
print(result[0]["value"][1] if result else "")
'
}
query_is() { [[ $(query "$1") == "$2" ]]; }
has_data() { [[ -n $(query "$1") ]]; }
at_least() { python3 -c 'import sys; sys.exit(0 if sys.argv[1] and float(sys.argv[1]) >= float(sys.argv[2]) else 1)' "$(query "$1")" "$2"; }

if wait_until "$QUERY_WAIT" query_is 'up{job="tokengate"}' 1; then
  pass 'up{job="tokengate"} is 1'
else
  die "Prometheus never scraped tokengate (up=$(query 'up{job="tokengate"}' || true))"
fi
if wait_until "$QUERY_WAIT" query_is 'tokengate_token_valid{job="tokengate",integration="e2e"}' 1; then
  pass 'tokengate_token_valid{integration="e2e"} is 1'
else
  fail "tokengate_token_valid never became 1"
fi

# ---- traffic through tokengate, spread over a few scrapes so rates are not 0 ----
SENT_OK=0
SENT_5XX=0
for _ in 1 2 3 4 5 6 7 8 9 10; do
  [[ $(http_status "$PROXY/v2/orders?page=1") == 200 ]] && SENT_OK=$((SENT_OK + 1))
  [[ $(http_status "$PROXY/status/503") == 503 ]] && SENT_5XX=$((SENT_5XX + 1))
  sleep 0.3
done
if [[ $SENT_OK == 10 && $SENT_5XX == 10 ]]; then
  pass "10 calls answered 200 and 10 answered 503 through tokengate"
else
  fail "through tokengate: $SENT_OK of 10 answered 200, $SENT_5XX of 10 answered 503"
fi
if wait_until "$QUERY_WAIT" at_least 'sum(tokengate_requests_total{job="tokengate",integration="e2e",code="200",method="GET"})' 10; then
  pass "Prometheus counts the traffic (tokengate_requests_total)"
else
  fail "tokengate_requests_total in Prometheus: $(query 'sum(tokengate_requests_total{job="tokengate"})' || true)"
fi

# ---- fleet mode as Prometheus sees it ----
if [[ $FLEET == 1 ]]; then
  # fleet_is WHAT QUERY VALUE: the query's first value becomes VALUE within QUERY_WAIT.
  fleet_is() {
    if wait_until "$QUERY_WAIT" query_is "$2" "$3"; then pass "fleet: $1"
    else fail "fleet: $1: $2 = $(query "$2" || true), want $3"; fi
  }
  fleet_is "A and B are connected to Redis" "min(tokengate_fleet_redis_up{instance=~\"$A_ADMIN|$B_ADMIN\"})" 1
  fleet_is "C's Redis is unreachable: redis_up 0" "tokengate_fleet_redis_up{instance=\"$C_ADMIN\"}" 0
  fleet_is "one token request between A and B" 'sum(tokengate_token_refreshes_total{integration="fleet",result="success"})' 1
  fleet_is "A and B hold a generation" 'min(tokengate_fleet_generation{integration="fleet"}) >= bool 1' 1
  fleet_is "A and B hold the same generation" 'max(tokengate_fleet_generation{integration="fleet"}) - min(tokengate_fleet_generation{integration="fleet"})' 0
  fleet_is "B adopted A's token" 'sum(tokengate_fleet_adoptions_total{integration="fleet"}) >= bool 1' 1
  fleet_is "C fetched its token alone" 'sum(tokengate_fleet_local_fetches_total{integration="fleet_down"}) >= bool 1' 1
  # Every known label combination, at 0 from the start, on a member with Redis and on one
  # without: claims 4 triggers x 3 results, adoptions 2 vias, rejections 2 whys.
  for m in A C; do
    admin=${m}_ADMIN
    for series in 'tokengate_fleet_claims_total:12' 'tokengate_fleet_adoptions_total:2' \
        'tokengate_fleet_entries_rejected_total:2' 'tokengate_fleet_local_fetches_total:1' \
        'tokengate_fleet_generation:1' 'tokengate_fleet_redis_up:1'; do
      fleet_is "$m exports ${series##*:} series of ${series%%:*}" "count(${series%%:*}{instance=\"${!admin}\"})" "${series##*:}"
    done
  done
fi

# ---- every alert of the README, its threshold removed, returns data ----
# Without fleet members (a binary from before fleet mode) the fleet metrics have no series.
needs_fleet() { [[ $FLEET == 0 && $1 == *tokengate_fleet_* ]]; }
ALERTS=()
while IFS=$'\t' read -r name expr; do
  ALERTS+=("$name")
  signal=$(sed -E 's/[[:space:]]+(==|!=|>=|<=|>|<)[[:space:]]+[-+0-9.eE]+[[:space:]]*$//' <<<"$expr")
  if [[ $signal == "$expr" ]]; then
    fail "$name: expr does not end in a threshold comparison: $expr"
  elif needs_fleet "$signal"; then
    say "SKIP: $name: no fleet members to give $signal data"
  elif wait_until "$QUERY_WAIT" has_data "$signal"; then
    pass "$name: $signal = $(query "$signal")"
  else
    fail "$name: no data for $signal"
  fi
  if [[ -f $README ]] && grep -q 'TokengateTokenExpiringWithoutRefresh' "$README"; then
    if grep -qF -- "$expr" "$README"; then
      pass "$name: the README quotes this expr"
    else
      fail "$name: the README's expr differs from $RULES"
    fi
  fi
done < <(awk '/^ *- alert: /{name=$3} /^ *expr: /{sub(/^ *expr: /, ""); print name "\t" $0}' "$RULES")
((${#ALERTS[@]} >= 5)) || fail "only ${#ALERTS[@]} alerts in $RULES"

# ---- every query of the Grafana dashboard returns data ----
DASHBOARD=$REPO_ROOT/deploy/kubernetes/base/grafana-dashboard.json
if DASH_QUERIES=$(python3 "$HERE/lib/queries.py" --labelled "$DASHBOARD"); then
  while IFS=$'\t' read -r where q; do
    if needs_fleet "$q"; then say "SKIP: dashboard $where: no fleet members to give it data"
    elif wait_until "$QUERY_WAIT" has_data "$q"; then pass "dashboard $where: $(query "$q")"
    else fail "dashboard $where: no data for $q"; fi
  done <<<"$DASH_QUERIES"
else
  fail "cannot extract the dashboard's queries from $DASHBOARD"
fi

# Every rule was loaded and evaluates without error.
rules_ok() {
  curl -fsS --max-time 5 "$PROM/api/v1/rules" | python3 -c '
import json, sys
rules = [r for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"]]
names = sorted(r["name"] for r in rules)
bad = [r["name"] for r in rules if r.get("health") != "ok"]
want = sorted(sys.argv[1:])
sys.exit(0 if names == want and not bad else "rules %s, unhealthy %s" % (names, bad))
' "${ALERTS[@]}"
}
if wait_until "$QUERY_WAIT" rules_ok; then
  pass "Prometheus loaded all ${#ALERTS[@]} rules and evaluates them cleanly"
else
  fail "rules not loaded or unhealthy: $(rules_ok 2>&1 || true)"
fi

# Half the calls were 5xx: that alert is pending (its `for` is longer than this run); so is
# TokengateFleetRedisDown for member C; the others are quiet.
alert_states() {
  curl -fsS --max-time 5 "$PROM/api/v1/alerts" |
    python3 -c 'import json, sys; print(" ".join(sorted("%s=%s" % (a["labels"]["alertname"], a["state"]) for a in json.load(sys.stdin)["data"]["alerts"])))'
}
five_xx_active() { [[ $(alert_states) == *TokengateHigh5xxRate=* ]]; }
if wait_until "$QUERY_WAIT" five_xx_active; then
  pass "TokengateHigh5xxRate is active after the 503s"
else
  fail "TokengateHigh5xxRate not active: $(alert_states || true)"
fi
WANT_STATES="TokengateHigh5xxRate=pending"
if [[ $FLEET == 1 ]]; then
  WANT_STATES="TokengateFleetRedisDown=pending $WANT_STATES"
  redis_down_pending() { [[ $(alert_states) == *TokengateFleetRedisDown=pending* ]]; }
  if wait_until "$QUERY_WAIT" redis_down_pending; then
    pass "TokengateFleetRedisDown is pending for the member whose Redis is unreachable"
  else
    fail "TokengateFleetRedisDown not pending: $(alert_states || true)"
  fi
fi
STATES=$(alert_states)
if [[ $STATES == "$WANT_STATES" ]]; then
  pass "no other alert is active ($STATES)"
else
  fail "active alerts: $STATES (want $WANT_STATES)"
fi

# ---- tokengate drains and exits 0 on SIGTERM ----
kill -TERM "$TOKENGATE_PID"
if wait_until "$STOP_WAIT" bash -c "! kill -0 $TOKENGATE_PID"; then
  code=0
  wait "$TOKENGATE_PID" || code=$?
  if [[ $code == 0 ]] && grep -q '"drained: every in-flight request finished"' "$WORK/tokengate.log"; then
    pass "tokengate drained and exited 0 on SIGTERM"
  else
    fail "tokengate exited $code after SIGTERM"
  fi
else
  fail "tokengate still running ${STOP_WAIT}s after SIGTERM"
fi
if grep -qF -- "$(cat "$WORK/client_secret")" "$WORK/tokengate.log"; then
  fail "the client secret reached tokengate's log"
fi
if [[ $FLEET == 1 ]] && grep -qF -- "$(cat "$WORK/fleet_client_secret")" "$WORK"/[ABC].log; then
  fail "the fleet's client secret reached a fleet member's log"
fi
