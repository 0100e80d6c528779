#!/usr/bin/env bash
# Soak: concurrent GET/POST traffic through the release tokengate to the stand-in Delivery
# Hub for a set time, with 5-second tokens revoked at every token age (random moments, right
# after a forced and right after a scheduled refresh, pairs 1 s, 3 s and 6 s apart; on
# average every REVOKE_EVERY seconds), and checks: no client-visible failure of a replayable
# call, tokens fetched on schedule and after revocations but never more than one forced fetch
# per 5 s, and tokengate's RSS flat within 20 %.
#
#   examples/load ──http──▶ tokengate ──http + Bearer──▶ examples/standin (API)
#                                 └── client_credentials (every ~4 s, and after a 401) ──┘
#
# Usage: bench/soak.sh            (builds tokengate and the two examples with cargo --release)
#   DURATION        seconds of traffic (default 120; CI runs 20)
#   CONCURRENCY     concurrent client connections (default 16)
#   LIFETIME        token lifetime at the stand-in, seconds (default 5)
#   REVOKE_EVERY    mean pause of the stand-in's revocation rounds, seconds (default 15;
#                   examples/standin.rs `revocations` has the pattern)
#   WARMUP          seconds of traffic before the starting RSS is read (default 5, at most
#                   a quarter of DURATION)
#   RSS_GROWTH_MAX  allowed RSS growth from start to end, percent (default 20)
#   SOAK_KEEP       =1: keep the work directory (config, logs, samples)
# The last line is `soak: N passed, M failed` (checks); the exit status is 0 only if M is 0.
# See bench/SOAK.md for what each number means.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-120}
CONCURRENCY=${CONCURRENCY:-16}
LIFETIME=${LIFETIME:-5}
REVOKE_EVERY=${REVOKE_EVERY:-15}
WARMUP=${WARMUP:-5}
RSS_GROWTH_MAX=${RSS_GROWTH_MAX:-20}
# Large POSTs (64 KiB) exceed max_replay_body (16 KiB): they cannot be replayed after a
# revocation, so a 401 for one may reach the client. They are counted apart, not failed.
LARGE_EVERY=50
LARGE_BYTES=65536
MAX_REPLAY_BODY=16KiB

for n in DURATION CONCURRENCY LIFETIME REVOKE_EVERY WARMUP RSS_GROWTH_MAX; do
  [[ ${!n} =~ ^[0-9]+$ ]] || { echo "soak: $n must be a whole number, not '${!n}'" >&2; exit 2; }
done
((DURATION > 0)) || { echo "soak: DURATION must be above 0" >&2; exit 2; }
((WARMUP * 4 <= DURATION)) || WARMUP=$((DURATION / 4))

say() { printf '[soak] %s\n' "$*"; }
die() { printf '[soak] FAIL: %s\n' "$*" >&2; echo "soak: 0 passed, 1 failed"; exit 1; }

# The scratch directory, process cleanup and counted checks of the end-to-end scripts.
E2E_KEEP=${SOAK_KEEP:-0}
# shellcheck source-path=SCRIPTDIR source=../.ci/e2e/lib/common.sh
source "$REPO_ROOT/.ci/e2e/lib/common.sh"
e2e_setup soak

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Sum of the samples of one metric whose labels contain every given label pair.
metric() {
  local name=$1; shift
  awk -v name="$name" -v want="$*" '
    index($0, name "{") == 1 {
      n = split(want, pairs, " "); ok = 1
      for (i = 1; i <= n; i++) if (index($0, pairs[i]) == 0) ok = 0
      if (ok) sum += $NF
    }
    END { printf "%d\n", sum }' "$WORK/metrics.txt"
}
# Waits (bounded, 15 s) for a match of a pattern in a file while `pid` lives; prints the
# match, or fails (the caller dies: this runs in a command substitution).
wait_log() {
  local file=$1 pattern=$2 pid=$3 i match
  for ((i = 0; i < 150; i++)); do
    match=$(grep -o -m1 -E "$pattern" "$file" 2>/dev/null || true)
    if [[ -n $match ]]; then printf '%s\n' "$match"; return 0; fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}


# --- 1. Build ------------------------------------------------------------------------------
cd "$REPO_ROOT"
say "cargo build --release (tokengate, examples standin and load)"
cargo build --release --locked --quiet --bin tokengate --example standin --example load ||
  die "cargo build failed"
BIN=$REPO_ROOT/target/release

# --- 2. Stand-in hub -----------------------------------------------------------------------
"$BIN/examples/standin" --port 0 --lifetime-secs "$LIFETIME" --revoke-every-secs "$REVOKE_EVERY" \
  >"$WORK/standin.out" 2>"$WORK/standin.log" &
PIDS+=($!)
HUB=$(wait_log "$WORK/standin.out" '^http://127\.0\.0\.1:[0-9]+$' "${PIDS[-1]}") ||
  die "the stand-in did not print its URL within 15 s"
say "stand-in at $HUB: ${LIFETIME}s tokens, revoked at every age (rounds ~${REVOKE_EVERY}s apart)"

# --- 3. tokengate --------------------------------------------------------------------------
# Port 0 everywhere: the addresses come from tokengate's own log lines, so no port can race.
CONFIG=$WORK/tokengate.toml
cat >"$CONFIG" <<EOF
[server]
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"

[[integration]]
name = "soak"
listen = "127.0.0.1:0"
token_url = "$HUB/oauth/token"
upstream = "$HUB"
client_id = "soak-client"
client_secret = { env = "SOAK_CLIENT_SECRET" }
max_replay_body = "$MAX_REPLAY_BODY"
EOF
# Access lines off: one per request is ~200 MB a minute at this rate, and I/O to the log is
# not what the soak is about; every other info line (tokens, revocations, errors) stays.
SOAK_CLIENT_SECRET=soak-secret-$RANDOM TOKENGATE_LOG=info,tokengate::access=warn \
  "$BIN/tokengate" --config "$CONFIG" 2>"$WORK/tokengate.log" &
TG_PID=$!
PIDS+=("$TG_PID")
ADMIN=$(wait_log "$WORK/tokengate.log" 'admin=127\.0\.0\.1:[0-9]+' "$TG_PID") ||
  die "tokengate did not log its admin address within 15 s"
PROXY=$(wait_log "$WORK/tokengate.log" 'listen=127\.0\.0\.1:[0-9]+' "$TG_PID") ||
  die "tokengate did not log its listen address within 15 s"
ADMIN=http://${ADMIN#admin=}
PROXY=http://${PROXY#listen=}
READY=0
for ((i = 0; i < 100; i++)); do
  if [[ $(hcurl -o /dev/null -w '%{http_code}' "$ADMIN/readyz" 2>/dev/null || true) == 200 ]]; then READY=1; break; fi
  sleep 0.1
done
((READY)) || die "tokengate was not ready within 10 s"
RSS_IDLE=$(rss_kib "$TG_PID")
say "tokengate ready: proxy $PROXY, admin $ADMIN, RSS ${RSS_IDLE} KiB idle"

# --- 4. Traffic ------------------------------------------------------------------------------
say "${DURATION}s of traffic from $CONCURRENCY connections (GET, small POST, every ${LARGE_EVERY}th a ${LARGE_BYTES}-byte POST)"
"$BIN/examples/load" --url "$PROXY" --duration-secs "$DURATION" --concurrency "$CONCURRENCY" \
  --large-every "$LARGE_EVERY" --large-bytes "$LARGE_BYTES" >"$WORK/load.out" 2>"$WORK/load.log" &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
# RSS once a second while the load runs: "start" is the first sample after the warm-up
# (pools, buffers and allocator arenas have grown by then), "end" the last one.
STARTED=$SECONDS
: >"$WORK/rss.txt"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  kill -0 "$TG_PID" 2>/dev/null || break
  echo "$((SECONDS - STARTED)) $(rss_kib "$TG_PID")" >>"$WORK/rss.txt"
  sleep 1
done
LOAD_RC=0
wait "$LOAD_PID" || LOAD_RC=$?
TG_ALIVE=0
kill -0 "$TG_PID" 2>/dev/null && TG_ALIVE=1
hcurl "$ADMIN/metrics" >"$WORK/metrics.txt" 2>/dev/null || : >"$WORK/metrics.txt"

read -r RSS_START_AT RSS_START < <(awk -v w="$WARMUP" '$1 >= w && $2 > 0 {print; exit}' "$WORK/rss.txt") || true
read -r RSS_END_AT RSS_END < <(awk '$2 > 0 {last = $0} END {print last}' "$WORK/rss.txt") || true
RSS_START=${RSS_START:-0}; RSS_END=${RSS_END:-0}
RSS_MAX=$(awk '{if ($2 > m) m = $2} END {print m + 0}' "$WORK/rss.txt")

# --- 5. Shutdown -----------------------------------------------------------------------------
TG_RC=none
if ((TG_ALIVE)); then
  kill -TERM "$TG_PID"
  for ((i = 0; i < 100; i++)); do kill -0 "$TG_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$TG_PID" 2>/dev/null; then TG_RC=hung; else TG_RC=0; wait "$TG_PID" || TG_RC=$?; fi
fi

# --- 6. Report and checks ----------------------------------------------------------------------
value() { awk -v k="$1" '$1 == k {print $2; found = 1} END {if (!found) print 0}' "$WORK/load.out"; }
REQUESTS=$(value requests)
R_OK=$(value replayable_ok); R_FAILED=$(value replayable_failed)
N_OK=$(value non_replayable_ok); N_FAILED=$(value non_replayable_failed)
REVOCATIONS=$(grep -c 'revoked every token' "$WORK/standin.log" || true)
FETCH_OK=$(metric tokengate_token_refreshes_total 'result="success"')
FETCH_FAILED=$(metric tokengate_token_refreshes_total 'result="failure"')
FETCH_SCHEDULED=$(metric tokengate_token_refreshes_total 'result="success"' 'trigger="scheduled"')
FETCH_401=$(metric tokengate_token_refreshes_total 'result="success"' 'trigger="unauthorized"')
REPLAYS_OK=$(metric tokengate_unauthorized_replays_total 'result="success"')
REPLAYS_FAILED=$(metric tokengate_unauthorized_replays_total 'result="failure"')
REPLAYS_NOT=$(metric tokengate_unauthorized_replays_total 'result="not_replayable"')
UPSTREAM_ERRORS=$(metric tokengate_upstream_errors_total)
IN_FLIGHT=$(metric tokengate_in_flight_requests)
GROWTH=none
((RSS_START > 0)) && GROWTH=$(((RSS_END - RSS_START) * 100 / RSS_START))

echo
say "requests:        $REQUESTS in ${DURATION}s ($((REQUESTS / DURATION))/s), $CONCURRENCY connections"
say "  replayable:    $R_OK ok, $R_FAILED failed"
say "  non-replayable ($LARGE_BYTES-byte POSTs > max_replay_body): $N_OK ok, $N_FAILED failed"
while read -r _ class reason count; do
  say "  failure        $class $reason: $count"
done < <(grep '^failure ' "$WORK/load.out" || true)
say "revocations:     $REVOCATIONS"
say "token fetches:   $FETCH_OK ok ($FETCH_SCHEDULED scheduled, $FETCH_401 after a 401), $FETCH_FAILED failed"
say "401 replays:     $REPLAYS_OK ok, $REPLAYS_FAILED failed, $REPLAYS_NOT not replayable"
say "upstream errors: $UPSTREAM_ERRORS"
say "RSS (KiB):       idle $RSS_IDLE, start $RSS_START (${RSS_START_AT:-?}s), end $RSS_END (${RSS_END_AT:-?}s), max $RSS_MAX; growth ${GROWTH}%"
echo

check "the load generator ran to the end (exit $LOAD_RC)" test "$LOAD_RC" = 0
check "requests were made ($REQUESTS)" test "$REQUESTS" -gt 0
check "no replayable call failed as seen by the client ($R_FAILED of $((R_OK + R_FAILED)))" test "$R_FAILED" -eq 0
check "tokengate survived the run" test "$TG_ALIVE" = 1
check "no token fetch failed ($FETCH_FAILED)" test "$FETCH_FAILED" -eq 0
# Revocations replace some scheduled refreshes with forced ones; a quarter still comes.
MIN_SCHEDULED=$((DURATION / LIFETIME / 4))
check "tokens were refreshed on schedule ($FETCH_SCHEDULED scheduled fetches, at least $MIN_SCHEDULED expected)" \
  test "$FETCH_SCHEDULED" -ge "$MIN_SCHEDULED"
if ((REVOCATIONS > 0)); then
  check "revocations were answered by fetches after a 401 ($FETCH_401 for $REVOCATIONS revocations)" \
    test "$FETCH_401" -ge 1
fi
# The forced-refresh floor: at most one per 5 s, however many revocations and 401s.
MAX_FORCED=$((DURATION / 5 + 2))
check "at most one forced fetch per 5 s ($FETCH_401 in ${DURATION}s, at most $MAX_FORCED)" \
  test "$FETCH_401" -le "$MAX_FORCED"
check "no request was left in flight ($IN_FLIGHT)" test "$IN_FLIGHT" -eq 0
rss_flat() { ((RSS_START > 0 && RSS_END * 100 <= RSS_START * (100 + RSS_GROWTH_MAX))); }
check "RSS flat: end $RSS_END KiB within ${RSS_GROWTH_MAX}% of start $RSS_START KiB (growth ${GROWTH}%)" rss_flat
check "tokengate exited 0 after SIGTERM (exit: $TG_RC)" test "$TG_RC" = 0

e2e_finish
