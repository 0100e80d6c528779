#!/usr/bin/env bash
# Fleet mode's benchmark: token fetches per refresh period, Redis commands per second and
# notification-to-adoption latency as the fleet grows (1, 10, 100, 1,000 members, the larger
# sizes spread over 4 processes), then the request path with fleet mode on vs off. Everything
# is done by examples/fleet_bench.rs (its //! doc says how); this script builds it, makes sure
# redis-server exists, raises the file descriptor limit and prints the tables on stdout.
# bench/FLEET.md holds the figures of a run and how to read them. Not part of CI: about
# 3 minutes after the build.
#
# Settings (environment):
#   SIZES="1:1,10:2,100:4,1000:4"   members:processes per size
#   PERIODS=4         refresh periods measured per size
#   LIFETIME=6        token lifetime in seconds (refresh at 80 %: every 4.8 s)
#   SPREAD_MS=5000    each process starts its members over this many milliseconds
#   AB_ROUNDS=3 AB_SECS=5 AB_CONNS=64   the request-path comparison
#   REDIS_URL=        use this Redis (it is FLUSHALLed) instead of starting redis-server
#   SKIP_BUILD=1      do not run cargo build
#   FLEET_BENCH_LOG=warn   show the instances' own log on stderr (a tracing filter)
# Arguments are passed on to fleet_bench, e.g. `bench/fleet.sh --resp3 --skip-ab` (members
# speak RESP3 to Redis) or `bench/fleet.sh --skip-fleet` (the request path only).
set -Eeuo pipefail
trap 'echo "[fleet-bench] failed at line $LINENO: $BASH_COMMAND" >&2' ERR

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SIZES=${SIZES:-1:1,10:2,100:4,1000:4}
PERIODS=${PERIODS:-4}
LIFETIME=${LIFETIME:-6}
SPREAD_MS=${SPREAD_MS:-5000}
AB_ROUNDS=${AB_ROUNDS:-3}
AB_SECS=${AB_SECS:-5}
AB_CONNS=${AB_CONNS:-64}
REDIS_URL=${REDIS_URL:-}

say() { echo "[fleet-bench] $*" >&2; }
die() {
  say "$*"
  exit 1
}

if [[ -z $REDIS_URL ]]; then
  # The same install as the tests' (Debian's package, never started as a service).
  bash "$ROOT/.ci/install-redis-server.sh" >&2 || die "cannot install redis-server"
fi

if [[ ${SKIP_BUILD:-} != 1 ]]; then
  say "cargo build --release --example fleet_bench"
  cargo build --release --example fleet_bench >&2
fi
BIN="$ROOT/target/release/examples/fleet_bench"
[[ -x $BIN ]] || die "no $BIN (cargo build --release --example fleet_bench)"

# Each member holds about six descriptors (two listeners, two Redis connections, HTTP
# clients), so 250 members per process need more than the common soft limit of 1024; Redis
# needs two per member as well.
hard=$(ulimit -Hn)
want=65536
if [[ $hard != unlimited ]] && ((hard < want)); then want=$hard; fi
ulimit -n "$want" || say "could not raise the file descriptor limit to $want (now $(ulimit -n))"
say "file descriptor limit $(ulimit -n); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"

args=(--sizes "$SIZES" --periods "$PERIODS" --lifetime-secs "$LIFETIME"
  --start-spread-ms "$SPREAD_MS" --ab-rounds "$AB_ROUNDS" --ab-secs "$AB_SECS"
  --ab-conns "$AB_CONNS")
if [[ -n $REDIS_URL ]]; then args+=(--redis "$REDIS_URL"); fi

started=$SECONDS
"$BIN" "${args[@]}" "$@"
say "done in $((SECONDS - started)) s; load average now $(cut -d' ' -f1-3 /proc/loadavg)"
