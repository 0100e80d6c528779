#!/usr/bin/env bash
# tokengate's benchmark: the same load, in one run on one machine, interleaved, against
#   direct      the upstream itself (nginx),
#   nginx       nginx as a reverse proxy (one worker, upstream keepalive, a static
#               `proxy_set_header Authorization "Bearer …"`), access log off,
#   tokengate   tokengate with TOKENGATE_LOG=warn (no access lines),
#   floor       hyper alone with tokengate's connection strategy (examples/floor.rs), one
#               process per upstream kind: tokengate vs floor is tokengate's own cost,
#               floor vs nginx is hyper's,
#   nginx-log / tokengate-log   the same two with their access logs on (to a file),
#   tg-compare  (only with COMPARE_BIN=path) a second tokengate binary, for before/after,
# with each proxy pinned to one CPU and wrk (and the upstream) on the other. It writes
# bench/RESULTS.md; see bench/README.md for what is measured and how to read it.
#
# Settings (environment):
#   ROUNDS=1          rounds; the target order rotates between cells and rounds, and the
#                     report shows per-cell medians (ratios are taken within a round first)
#   DURATION=10       seconds per measurement (wrk takes whole seconds); WARMUP=1 before each
#   CONNS="1 16 64 256"   connection counts; CONNS_POST / CONNS_BIG override for those payloads
#   PAYLOADS="get post big"   small GET, 64 KiB POST, 1 MiB response
#   UPSTREAMS="plain tls h2"  plain-HTTP upstream, HTTPS upstream speaking HTTP/1.1, and
#                     HTTPS upstream offering h2 (measured with direct, tokengate, floor and
#                     tg-compare only: nginx cannot proxy over h2)
#   H2_PAYLOADS="get post"    payloads measured with the h2 upstream
#   TARGETS="direct nginx tokengate floor nginx-log tokengate-log"
#   LOG_PAYLOADS="get"        payloads for which the *-log targets are measured
#   QUICK=1           quick mode: DURATION=2, fewer cells, ~3 minutes with every target and
#                     upstream kind (a smoke test; .ci/run does not call it)
#   COMPARE_BIN=path  add target tg-compare running that tokengate binary
#   TOKENGATE_BIN=path  measure this binary instead of target/release/tokengate (no build)
#   FLOOR_BIN=path    the floor binary instead of target/release/examples/floor (with
#                     TOKENGATE_BIN or SKIP_BUILD=1 that one must already be built)
#   SKIP_BUILD=1      do not run cargo build
#   PROXY_CPU=1 LOAD_CPU=0   CPUs for the proxy under test and for wrk + upstream
#   BASE_PORT=18400   first of the loopback ports used (BASE_PORT .. BASE_PORT+62)
#   IDLE_SECS=5       idle window for the idle-CPU measurement
#   OUT=bench/RESULTS.md   the report (QUICK=1 writes bench/RESULTS.quick.md unless set)
#   KEEP_WORK=1       keep the scratch directory (configs, logs, raw results)
set -Eeuo pipefail
trap 'echo "[bench] failed at line $LINENO: $BASH_COMMAND" >&2' ERR

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COMMAND_LINE="$0${*:+ $*}"
for v in QUICK ROUNDS DURATION WARMUP CONNS CONNS_POST CONNS_BIG PAYLOADS UPSTREAMS TARGETS \
    LOG_PAYLOADS H2_PAYLOADS COMPARE_BIN TOKENGATE_BIN FLOOR_BIN SKIP_BUILD PROXY_CPU LOAD_CPU \
    BASE_PORT IDLE_SECS OUT; do
    if [[ -n ${!v:-} ]]; then
        COMMAND_LINE="$v=${!v} $COMMAND_LINE"
    fi
done

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    DURATION=${DURATION:-2}
    CONNS=${CONNS:-"16 256"}
    CONNS_POST=${CONNS_POST:-16}
    CONNS_BIG=${CONNS_BIG:-16}
    IDLE_SECS=${IDLE_SECS:-2}
    OUT=${OUT:-bench/RESULTS.quick.md}
fi
ROUNDS=${ROUNDS:-1}
DURATION=${DURATION:-10}
DURATION=${DURATION%s}
WARMUP=${WARMUP:-1}
WARMUP=${WARMUP%s}
CONNS=${CONNS:-"1 16 64 256"}
CONNS_POST=${CONNS_POST:-$CONNS}
CONNS_BIG=${CONNS_BIG:-$CONNS}
PAYLOADS=${PAYLOADS:-"get post big"}
UPSTREAMS=${UPSTREAMS:-"plain tls h2"}
TARGETS=${TARGETS:-"direct nginx tokengate floor nginx-log tokengate-log"}
LOG_PAYLOADS=${LOG_PAYLOADS:-get}
H2_PAYLOADS=${H2_PAYLOADS:-"get post"}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
BASE_PORT=${BASE_PORT:-18400}
IDLE_SECS=${IDLE_SECS:-5}
OUT=${OUT:-bench/RESULTS.md}
COMPARE_BIN=${COMPARE_BIN:-}
if [[ -n $COMPARE_BIN ]]; then
    TARGETS="$TARGETS tg-compare"
fi

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
if [[ ${UPSTREAM_H2:-0} != 0 ]]; then
    die "UPSTREAM_H2 is gone: the h2 upstream is an upstream kind of its own (UPSTREAMS=\"plain tls h2\")"
fi

# --- tools --------------------------------------------------------------------------------

need_packages=()
command -v wrk >/dev/null || need_packages+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_packages+=(nginx)
command -v openssl >/dev/null || need_packages+=(openssl)
command -v curl >/dev/null || need_packages+=(curl)
command -v pgrep >/dev/null || need_packages+=(procps)
command -v taskset >/dev/null || need_packages+=(util-linux)
if ((${#need_packages[@]})); then
    log "installing ${need_packages[*]} from Debian's packages"
    sudo=()
    if [[ $(id -u) != 0 ]]; then
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "${need_packages[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
if ((NCPU < 2)); then
    die "needs at least 2 CPUs (one for the proxy under test, one for the load); found $NCPU"
fi

if [[ -n ${TOKENGATE_BIN:-} ]]; then
    TG_BIN=$(realpath "$TOKENGATE_BIN")
    SKIP_BUILD=1
else
    TG_BIN=$ROOT/target/release/tokengate
fi
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building tokengate, the stand-in token endpoint and the floor (release)"
    cargo build --release --locked
    cargo build --release --locked --example standin --example floor
fi
HUB_BIN=$ROOT/target/release/examples/standin
[[ -x $TG_BIN ]] || die "no tokengate binary at $TG_BIN"
[[ -x $HUB_BIN ]] || die "no stand-in at $HUB_BIN (cargo build --release --example standin)"
if [[ " $TARGETS " == *" floor "* ]]; then
    FLOOR_BIN=$(realpath "${FLOOR_BIN:-$ROOT/target/release/examples/floor}")
    [[ -x $FLOOR_BIN ]] || die "no floor at $FLOOR_BIN (cargo build --release --example floor)"
fi
if [[ -n $COMPARE_BIN ]]; then
    COMPARE_BIN=$(realpath "$COMPARE_BIN")
    [[ -x $COMPARE_BIN ]] || die "COMPARE_BIN $COMPARE_BIN is not executable"
fi

# --- scratch directory, ports, cleanup ----------------------------------------------------

W=$(mktemp -d /tmp/tokengate-bench.XXXXXX)
# nginx workers run as an unprivileged user when started as root: they must read www/.
chmod 755 "$W"
declare -A PIDS=()

stop_pid() {
    local pid=$1
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for i in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
            : "$i"
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$? name
    for name in "${!PIDS[@]}"; do
        stop_pid "${PIDS[$name]}"
    done
    # A run that dies half-way (a full disk, a crash) still leaves what it measured.
    if ((status != 0)) && [[ -s ${RESULTS:-} ]] && cp "$RESULTS" "${OUT%.md}.partial.tsv"; then
        log "partial results kept in ${OUT%.md}.partial.tsv"
    fi
    if [[ ${KEEP_WORK:-0} == 1 ]]; then
        log "scratch directory kept: $W"
    else
        rm -rf "$W"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

P_UP_HTTP=$((BASE_PORT + 0))
P_UP_HTTPS=$((BASE_PORT + 1))
P_UP_H2=$((BASE_PORT + 2))
P_NGX_PLAIN=$((BASE_PORT + 10))
P_NGX_TLS=$((BASE_PORT + 11))
P_NGXLOG_PLAIN=$((BASE_PORT + 12))
P_NGXLOG_TLS=$((BASE_PORT + 13))
P_HUB=$((BASE_PORT + 20))
P_TG_PLAIN=$((BASE_PORT + 30))
P_TG_TLS=$((BASE_PORT + 31))
P_TG_ADMIN=$((BASE_PORT + 32))
P_TG_H2=$((BASE_PORT + 33))
P_TGLOG_PLAIN=$((BASE_PORT + 40))
P_TGLOG_TLS=$((BASE_PORT + 41))
P_TGLOG_ADMIN=$((BASE_PORT + 42))
P_TGLOG_H2=$((BASE_PORT + 43))
P_TGCMP_PLAIN=$((BASE_PORT + 50))
P_TGCMP_TLS=$((BASE_PORT + 51))
P_TGCMP_ADMIN=$((BASE_PORT + 52))
P_TGCMP_H2=$((BASE_PORT + 53))
P_FLOOR_PLAIN=$((BASE_PORT + 60))
P_FLOOR_TLS=$((BASE_PORT + 61))
P_FLOOR_H2=$((BASE_PORT + 62))

port_open() { { : >"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; }

for p in $P_UP_HTTP $P_UP_HTTPS $P_UP_H2 $P_NGX_PLAIN $P_NGX_TLS $P_NGXLOG_PLAIN $P_NGXLOG_TLS \
    $P_HUB $P_TG_PLAIN $P_TG_TLS $P_TG_ADMIN $P_TG_H2 $P_TGLOG_PLAIN $P_TGLOG_TLS $P_TGLOG_ADMIN \
    $P_TGLOG_H2 $P_TGCMP_PLAIN $P_TGCMP_TLS $P_TGCMP_ADMIN $P_TGCMP_H2 $P_FLOOR_PLAIN $P_FLOOR_TLS \
    $P_FLOOR_H2; do
    if port_open "$p"; then
        die "port 127.0.0.1:$p is in use; set BASE_PORT to another range"
    fi
done

# A 1 ms pause without starting a process: a read with a timeout on a pipe nobody writes to.
exec {PAUSE_FD}<> <(:)
pause_ms() {
    local i
    for ((i = 0; i < $1; i++)); do
        read -r -t 0.001 -u "$PAUSE_FD" _ || true
    done
}

wait_port() {
    local port=$1 what=$2 i
    for ((i = 0; i < 5000; i++)); do
        port_open "$port" && return 0
        pause_ms 1
    done
    die "$what did not listen on 127.0.0.1:$port within 5 s"
}

# Status code of GET path on 127.0.0.1:port, in HTTP_STATUS (no process started: bash's
# /dev/tcp), or 000 when nothing answers.
HTTP_STATUS=000
http_status() {
    local port=$1 path=$2 fd
    HTTP_STATUS=000
    { exec {fd}<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 0
    { printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" 1>&"$fd"; } 2>/dev/null || true
    IFS=' ' read -r -t 5 _ HTTP_STATUS _ <&"$fd" || HTTP_STATUS=000
    exec {fd}>&-
}

# --- /proc readings -----------------------------------------------------------------------

# The fields of /proc/PID/stat named by the indexes in $1 (proc(5) numbering minus 3: the
# fields after the command name, from 0) summed over the pids that follow; the thread-group
# leader's line counts all its threads.
stat_sum() {
    local total=0 pid line rest i
    local -a f
    local -a fields
    read -r -a fields <<<"$1"
    shift
    for pid in "$@"; do
        read -r line <"/proc/$pid/stat"
        rest=${line##*) }
        read -r -a f <<<"$rest"
        for i in "${fields[@]}"; do
            total=$((total + f[i]))
        done
    done
    echo "$total"
}

# utime+stime in clock ticks (fields 14 and 15), summed over the given pids.
cpu_ticks() { stat_sum "11 12" "$@"; }

# Minor page faults (minflt, field 10), summed over the given pids.
min_faults() { stat_sum 7 "$@"; }

# VmHWM (peak RSS) in KiB summed over pids.
peak_rss_kib() {
    local total=0 pid key value _unit
    for pid in "$@"; do
        while read -r key value _unit; do
            if [[ $key == VmHWM: ]]; then
                total=$((total + value))
            fi
        done <"/proc/$pid/status"
    done
    echo "$total"
}

# The kernel's count of connections dropped because a listen queue was full (TcpExt
# ListenOverflows, machine-wide). A rise during a measurement means some clients waited for
# TCP's 1 s / 3 s / 7 s retransmissions: latency that is the listener's backlog, not the
# proxy's work.
listen_overflows() {
    awk '/^TcpExt:/ { if (!seen) { for (i = 2; i <= NF; i++) if ($i == "ListenOverflows") col = i; seen = 1 } else if (col) print $col }' /proc/net/netstat
}

# Resets VmHWM to the current RSS (Linux >= 4.0; root or the process owner), so each
# measurement reports its own peak. Returns 1 when the kernel refuses.
reset_peak() {
    local pid
    for pid in "$@"; do
        { echo 5 >"/proc/$pid/clear_refs"; } 2>/dev/null || return 1
    done
}

# Context switches (voluntary + involuntary) summed over every thread of the pids: how often
# a process woke up at all.
ctx_switches() {
    local total=0 pid task key value
    for pid in "$@"; do
        for task in /proc/"$pid"/task/*; do
            while read -r key value; do
                case $key in
                voluntary_ctxt_switches: | nonvoluntary_ctxt_switches:) total=$((total + value)) ;;
                esac
            done <"$task/status" 2>/dev/null || true
        done
    done
    echo "$total"
}

now_us() { echo "${EPOCHREALTIME/./}"; }

# --- certificates, upstream content -------------------------------------------------------

log "scratch directory $W"
mkdir -p "$W/www" "$W/tmp" "$W/logs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=tokengate bench CA" -keyout "$W/ca.key" -out "$W/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
    2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$W/server.key" -out "$W/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
    >"$W/server.ext"
openssl x509 -req -in "$W/server.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial \
    -days 30 -extfile "$W/server.ext" -out "$W/server.pem" 2>/dev/null

SMALL_JSON='{"id":"b7f3c2a1","status":"assigned","merchant_id":4242,"external_id":"OMS-100234","customer":{"name":"Ada Lovelace","phone":"+44 20 7946 0000"},"eta":"2025-01-01T12:30:00Z","items":2,"total":"42.50","currency":"EUR"}'
head -c $((1024 * 1024)) /dev/zero | tr '\0' 'x' >"$W/www/big"
chmod 644 "$W/www/big"
# The 64 KiB upload: a JSON list of orders, padded to exactly 65536 bytes.
body='{"orders":['
item='{"external_id":"OMS-100234","address":"1 Main Street, Springfield","items":2,"total":"42.50"},'
while ((${#body} + ${#item} + 64 < 65536)); do
    body+=$item
done
body+='{"pad":"'
pad=$((65536 - ${#body} - 4))
body+=$(printf '%*s' "$pad" '' | tr ' ' 'x')'"}]}'
printf '%s' "$body" >"$W/body.json"
[[ $(stat -c %s "$W/body.json") == 65536 ]] || die "POST body is not 64 KiB"

NGINX_COMMON="
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
master_process on;
events { worker_connections 2048; }
"
NGINX_HTTP_COMMON="
    client_body_temp_path $W/tmp/body;
    proxy_temp_path $W/tmp/proxy;
    fastcgi_temp_path $W/tmp/fastcgi;
    uwsgi_temp_path $W/tmp/uwsgi;
    scgi_temp_path $W/tmp/scgi;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_max_body_size 2m;
    client_body_buffer_size 128k;
"
# The upstream's answers, the same on every port.
UPSTREAM_COMMON="
        root $W/www;
        # What the proxy sent, so the script can check the injected header, and the protocol
        # it spoke (HTTP/1.1 or HTTP/2.0), so it can check that the h2 kind is h2.
        add_header X-Echo-Authorization \$http_authorization always;
        add_header X-Upstream-Protocol \$server_protocol always;
        # Delivery Hub sends these on every answer; tokengate reads RateLimit-Remaining.
        add_header RateLimit-Limit 300 always;
        add_header RateLimit-Remaining 299 always;
        add_header RateLimit-Reset 60 always;
        location = /small { return 200 '$SMALL_JSON'; }
        location = /big { default_type application/octet-stream; }"
printf '{"ok":true}' >"$W/www/upload"
chmod 644 "$W/www/upload"
# Three ports: plain HTTP, HTTPS offering HTTP/1.1 only (what both proxies use), and HTTPS
# offering h2 as well (nginx 1.22's "listen ... ssl http2": ALPN h2 and http/1.1; tokengate
# and the floor pick h2; wrk, which sends no ALPN, gets HTTP/1.1).
cat >"$W/upstream.conf" <<EOF
$NGINX_COMMON
pid $W/upstream.pid;
error_log $W/logs/upstream-error.log warn;
http {
$NGINX_HTTP_COMMON
    default_type application/json;
    ssl_certificate $W/server.pem;
    ssl_certificate_key $W/server.key;
    ssl_session_cache shared:up:1m;
    server {
        listen 127.0.0.1:$P_UP_HTTP;
        listen 127.0.0.1:$P_UP_HTTPS ssl;
$UPSTREAM_COMMON
        # The body is read (and discarded) by nginx; the answer is small.
        location = /upload { return 200 '{"ok":true}'; }
    }
    server {
        listen 127.0.0.1:$P_UP_H2 ssl http2;
$UPSTREAM_COMMON
        # Over h2 a "return" answers before the body arrives and skips the DATA frames that
        # follow; nginx's flood check counts skipped bytes against the connection and closes
        # it (GOAWAY, "http2 flood detected") after ~150 such uploads. So here the body is
        # read: the mirror module reads it before the content phase (its subrequest to /sink
        # answers 204 in-process), the static module then refuses POST on www/upload, and
        # error_page turns that into the same 200 answer.
        location = /upload {
            mirror /sink;
            error_page 405 =200 @uploaded;
        }
        location = /sink { internal; return 204; }
        location @uploaded { return 200 '{"ok":true}'; }
    }
}
EOF

# The nginx reverse proxy, configured as a user would for "add a static header": one worker,
# HTTP/1.1 to the upstream with keepalive, the token as a static proxy_set_header. Request
# bodies stream like tokengate's (no request buffering); responses pass through 16 x 64 KiB
# memory buffers, never a temp file (of the variants tried, the cheapest per 1 MiB response;
# `proxy_buffering off` cost ~10% more CPU there). worker_connections 2048 covers 256 clients
# plus their upstream connections without preallocating (and counting) memory for 16k.
write_nginx_proxy_conf() {
    local token=$1
    cat >"$W/proxy.conf" <<EOF
$NGINX_COMMON
pid $W/proxy.pid;
error_log $W/logs/proxy-error.log warn;
http {
$NGINX_HTTP_COMMON
    upstream up_plain {
        server 127.0.0.1:$P_UP_HTTP;
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    upstream up_tls {
        server 127.0.0.1:$P_UP_HTTPS;
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$proxy_host;
    proxy_set_header Authorization "Bearer $token";
    proxy_request_buffering off;
    proxy_buffering on;
    proxy_buffers 16 64k;
    proxy_busy_buffers_size 128k;
    proxy_max_temp_file_size 0;
    proxy_ssl_trusted_certificate $W/ca.pem;
    proxy_ssl_verify on;
    proxy_ssl_name localhost;
    proxy_ssl_session_reuse on;
    server {
        listen 127.0.0.1:$P_NGX_PLAIN;
        location / { proxy_pass http://up_plain; }
    }
    server {
        listen 127.0.0.1:$P_NGX_TLS;
        location / { proxy_pass https://up_tls; }
    }
    server {
        listen 127.0.0.1:$P_NGXLOG_PLAIN;
        access_log $W/logs/nginx-access.log;
        location / { proxy_pass http://up_plain; }
    }
    server {
        listen 127.0.0.1:$P_NGXLOG_TLS;
        access_log $W/logs/nginx-access.log;
        location / { proxy_pass https://up_tls; }
    }
}
EOF
}

write_tokengate_conf() {
    local file=$1 plain=$2 tls=$3 admin=$4 h2=$5
    cat >"$file" <<EOF
[server]
admin_listen = "127.0.0.1:$admin"
shutdown_grace = "1s"

[defaults]
token_url = "http://127.0.0.1:$P_HUB/oauth/token"
client_id = "tokengate-bench"
client_secret = { file = "$W/client_secret" }
ca_file = "$W/ca.pem"

[[integration]]
name = "plain"
listen = "127.0.0.1:$plain"
upstream = "http://127.0.0.1:$P_UP_HTTP"

[[integration]]
name = "tls"
listen = "127.0.0.1:$tls"
upstream = "https://127.0.0.1:$P_UP_HTTPS"

[[integration]]
name = "h2"
listen = "127.0.0.1:$h2"
upstream = "https://127.0.0.1:$P_UP_H2"
EOF
}

# --- processes ----------------------------------------------------------------------------

log "starting the upstream (nginx on CPU $LOAD_CPU) and the token endpoint"
taskset -c "$LOAD_CPU" "$NGINX" -p "$W" -e "$W/logs/upstream-error.log" -c "$W/upstream.conf" &
PIDS[upstream]=$!
taskset -c "$LOAD_CPU" "$HUB_BIN" --port "$P_HUB" --lifetime-secs 86400 >"$W/hub.out" 2>"$W/logs/hub.err" &
PIDS[hub]=$!
wait_port "$P_UP_HTTP" "the upstream nginx"
wait_port "$P_UP_HTTPS" "the upstream nginx (TLS)"
wait_port "$P_UP_H2" "the upstream nginx (TLS, h2)"
wait_port "$P_HUB" "the stand-in token endpoint"
HUB_URL="http://127.0.0.1:$P_HUB"
printf 'bench-secret\n' >"$W/client_secret"

# nginx's static token: what a cron job would have fetched.
NGINX_TOKEN=$(curl -sS --fail -X POST -d grant_type=client_credentials -d client_id=nginx-bench \
    -d client_secret=bench-secret "$HUB_URL/oauth/token" |
    sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')
[[ -n $NGINX_TOKEN ]] || die "the token endpoint gave no access_token"
write_nginx_proxy_conf "$NGINX_TOKEN"
write_tokengate_conf "$W/tg.toml" "$P_TG_PLAIN" "$P_TG_TLS" "$P_TG_ADMIN" "$P_TG_H2"
write_tokengate_conf "$W/tg-log.toml" "$P_TGLOG_PLAIN" "$P_TGLOG_TLS" "$P_TGLOG_ADMIN" "$P_TGLOG_H2"
write_tokengate_conf "$W/tg-compare.toml" "$P_TGCMP_PLAIN" "$P_TGCMP_TLS" "$P_TGCMP_ADMIN" "$P_TGCMP_H2"
"$TG_BIN" check --config "$W/tg.toml" >/dev/null || die "tokengate rejects the generated configuration"

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

START_SAMPLES=()
# Starts one tokengate pinned to PROXY_CPU and waits until /readyz answers 200 (every
# integration holds its first token); records the start-to-ready time in START_SAMPLES.
start_tokengate() {
    local name=$1 bin=$2 conf=$3 admin=$4 level=$5 t0 t1 i
    t0=$(now_us)
    if [[ $level == default ]]; then
        # Default logging: info, an access line per request, stderr appended to a file.
        taskset -c "$PROXY_CPU" env -u TOKENGATE_LOG "$bin" --config "$conf" 2>>"$W/logs/$name.err" &
    else
        taskset -c "$PROXY_CPU" env TOKENGATE_LOG="$level" "$bin" --config "$conf" 2>>"$W/logs/$name.err" &
    fi
    PIDS[$name]=$!
    for ((i = 0; i < 10000; i++)); do
        http_status "$admin" /readyz
        [[ $HTTP_STATUS == 200 ]] && break
        kill -0 "${PIDS[$name]}" 2>/dev/null || die "$name exited; see $W/logs/$name.err"
        pause_ms 1
    done
    [[ $HTTP_STATUS == 200 ]] || die "$name not ready within 10 s"
    t1=$(now_us)
    START_SAMPLES+=("$name $((t1 - t0))")
}

start_nginx_proxy() {
    taskset -c "$PROXY_CPU" "$NGINX" -p "$W" -e "$W/logs/proxy-error.log" -c "$W/proxy.conf" &
    PIDS[nginx]=$!
    wait_port "$P_NGX_PLAIN" "the nginx proxy"
    wait_port "$P_NGX_TLS" "the nginx proxy"
    wait_port "$P_NGXLOG_TLS" "the nginx proxy"
}

start_proxies() {
    if has_target nginx || has_target nginx-log; then
        start_nginx_proxy
    fi
    if has_target tokengate; then
        start_tokengate tokengate "$TG_BIN" "$W/tg.toml" "$P_TG_ADMIN" warn
    fi
    if has_target tokengate-log; then
        start_tokengate tokengate-log "$TG_BIN" "$W/tg-log.toml" "$P_TGLOG_ADMIN" default
    fi
    if has_target tg-compare; then
        start_tokengate tg-compare "$COMPARE_BIN" "$W/tg-compare.toml" "$P_TGCMP_ADMIN" warn
    fi
    if has_target floor; then
        local kind
        for kind in $UPSTREAMS; do
            start_floor "$kind"
        done
    fi
}

# One floor per upstream kind (it forwards to one upstream), pinned like the others. It has
# no readiness endpoint and needs none: it holds no token, so listening is ready.
start_floor() {
    local kind=$1 port upstream
    local -a ca=()
    case $kind in
    plain) port=$P_FLOOR_PLAIN upstream=http://127.0.0.1:$P_UP_HTTP ;;
    tls) port=$P_FLOOR_TLS upstream=https://127.0.0.1:$P_UP_HTTPS ca=(--ca "$W/ca.pem") ;;
    h2) port=$P_FLOOR_H2 upstream=https://127.0.0.1:$P_UP_H2 ca=(--ca "$W/ca.pem") ;;
    *) die "unknown upstream kind $kind" ;;
    esac
    # nginx's token: the same length as tokengate's, which the upstream echoes back.
    taskset -c "$PROXY_CPU" "$FLOOR_BIN" --listen "127.0.0.1:$port" --upstream "$upstream" \
        "${ca[@]}" --token "$NGINX_TOKEN" 2>>"$W/logs/floor-$kind.err" &
    PIDS[floor-$kind]=$!
    wait_port "$port" "the floor ($kind upstream)"
}

stop_proxies() {
    local name
    for name in nginx tokengate tokengate-log tg-compare floor-plain floor-tls floor-h2; do
        if [[ -n ${PIDS[$name]:-} ]]; then
            stop_pid "${PIDS[$name]}"
            unset "PIDS[$name]"
        fi
    done
}

# The pids whose CPU and memory count for a target (nginx: master and worker) when it serves
# the upstream KIND (the floor has a process per kind); without KIND, every process of it.
target_pids() {
    local target=$1 kind=${2:-} k
    case $target in
    direct) ;;
    nginx | nginx-log) echo "${PIDS[nginx]}" "$(pgrep -P "${PIDS[nginx]}" | tr '\n' ' ')" ;;
    floor)
        local -a pids=()
        for k in ${kind:-$UPSTREAMS}; do
            pids+=("${PIDS[floor-$k]}")
        done
        echo "${pids[*]}"
        ;;
    *) echo "${PIDS[$target]}" ;;
    esac
}

target_url() {
    local target=$1 kind=$2 path=$3 port scheme=http
    case $target:$kind in
    direct:plain) port=$P_UP_HTTP ;;
    direct:tls) port=$P_UP_HTTPS scheme=https ;;
    # wrk speaks HTTP/1.1 only: direct to the h2 port is HTTP/1.1 over TLS.
    direct:h2) port=$P_UP_H2 scheme=https ;;
    nginx:plain) port=$P_NGX_PLAIN ;;
    nginx:tls) port=$P_NGX_TLS ;;
    nginx-log:plain) port=$P_NGXLOG_PLAIN ;;
    nginx-log:tls) port=$P_NGXLOG_TLS ;;
    tokengate:plain) port=$P_TG_PLAIN ;;
    tokengate:tls) port=$P_TG_TLS ;;
    tokengate:h2) port=$P_TG_H2 ;;
    tokengate-log:plain) port=$P_TGLOG_PLAIN ;;
    tokengate-log:tls) port=$P_TGLOG_TLS ;;
    tokengate-log:h2) port=$P_TGLOG_H2 ;;
    tg-compare:plain) port=$P_TGCMP_PLAIN ;;
    tg-compare:tls) port=$P_TGCMP_TLS ;;
    tg-compare:h2) port=$P_TGCMP_H2 ;;
    floor:plain) port=$P_FLOOR_PLAIN ;;
    floor:tls) port=$P_FLOOR_TLS ;;
    floor:h2) port=$P_FLOOR_H2 ;;
    *) die "unknown target $target:$kind" ;;
    esac
    echo "$scheme://127.0.0.1:$port$path"
}

payload_path() {
    case $1 in
    get) echo /small ;;
    post) echo /upload ;;
    big) echo /big ;;
    *) die "unknown payload $1 (get, post, big)" ;;
    esac
}

# Every target answers every payload it is measured with, the proxies inject a Bearer token,
# and the upstream saw the protocol it should: HTTP/2.0 from the proxies of the h2 kind,
# HTTP/1.1 everywhere else (curl asks for HTTP/1.1 as wrk does).
sanity_check() {
    local kind target payload url headers protocol
    for kind in $UPSTREAMS; do
        for payload in $(payloads_for "$kind"); do
            for target in $(targets_for "$kind" "$payload"); do
                url=$(target_url "$target" "$kind" "$(payload_path "$payload")")
                local -a args=(-sS -k --http1.1 -o /dev/null -D - --max-time 10)
                if [[ $payload == post ]]; then
                    args+=(--data-binary "@$W/body.json" -H 'Content-Type: application/json')
                fi
                headers=$(curl "${args[@]}" "$url" | tr -d '\r') ||
                    die "$target ($kind upstream) does not answer $url"
                [[ $headers == "HTTP/1.1 200"* ]] ||
                    die "$target ($kind upstream): $url answered: ${headers%%$'\n'*}"
                if [[ $target != direct && $headers != *$'\n'[Xx]-[Ee]cho-[Aa]uthorization:\ Bearer\ ?* ]]; then
                    die "$target ($kind upstream) did not send a Bearer token upstream"
                fi
                protocol=HTTP/1.1
                if [[ $kind == h2 && $target != direct ]]; then
                    protocol=HTTP/2.0
                fi
                if [[ $'\n'$headers$'\n' != *$'\n'[Xx]-[Uu]pstream-[Pp]rotocol:\ $protocol$'\n'* ]]; then
                    die "$target ($kind upstream): the upstream did not see $protocol: $(grep -i '^x-upstream-protocol' <<<"$headers" || echo 'no X-Upstream-Protocol')"
                fi
            done
        done
    done
    log "sanity check passed: every target answers 200, the proxies inject Bearer tokens, the h2 upstream is spoken to in h2"
}

# --- measurement --------------------------------------------------------------------------

RESULTS=$W/results.tsv
# New columns go at the end: report.awk finds them by name, and older TSVs still read.
printf 'round\tupstream\tpayload\tconns\ttarget\trequests\tduration_us\tp50_us\tp99_us\terr_connect\terr_read\terr_write\terr_status\terr_timeout\tcpu_ticks\trss_kib\tminflt\tctxsw\n' >"$RESULTS"
HWM_RESET=1
OVERFLOWS=()

# Runs wrk (pinned to LOAD_CPU) against one target and appends a line to RESULTS.
measure() {
    local round=$1 kind=$2 payload=$3 conns=$4 target=$5 url body="" out c0 c1 f0 s0 rss=""
    local -a pids
    url=$(target_url "$target" "$kind" "$(payload_path "$payload")")
    if [[ $payload == post ]]; then
        body=$W/body.json
    fi
    read -r -a pids <<<"$(target_pids "$target" "$kind")"
    local -a wrk_cmd=(taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" --timeout 5s --latency -s "$ROOT/bench/wrk.lua")
    local overflows0
    overflows0=$(listen_overflows)
    # Warm-up: connections opened, pools filled, caches warm; not counted.
    if ((WARMUP > 0)); then
        BENCH_BODY_FILE=$body "${wrk_cmd[@]}" -d"${WARMUP}s" "$url" >/dev/null
    fi
    : >"$W/logs/nginx-access.log"
    [[ -z ${PIDS[tokengate-log]:-} ]] || : >"$W/logs/tokengate-log.err"
    if ((${#pids[@]})); then
        if ((HWM_RESET)) && ! reset_peak "${pids[@]}"; then
            HWM_RESET=0
            log "warning: cannot reset VmHWM (/proc/PID/clear_refs); peak RSS is since each group's start"
        fi
        c0=$(cpu_ticks "${pids[@]}")
        f0=$(min_faults "${pids[@]}")
        s0=$(ctx_switches "${pids[@]}")
    fi
    out=$(BENCH_BODY_FILE=$body "${wrk_cmd[@]}" -d"${DURATION}s" "$url")
    printf '== round %s %s %s c=%s %s\n%s\n' "$round" "$kind" "$payload" "$conns" "$target" "$out" \
        >>"$W/logs/wrk.log"
    local line
    line=$(grep '^BENCH ' <<<"$out") || die "no result from wrk for $target: $out"
    local requests duration p50 p99 econn eread ewrite estatus etimeout
    read -r requests duration p50 p99 econn eread ewrite estatus etimeout < <(
        sed 's/[a-z0-9_]*=//g; s/^BENCH //' <<<"$line"
    )
    local ticks="" faults="" switches=""
    if ((${#pids[@]})); then
        c1=$(cpu_ticks "${pids[@]}")
        faults=$(($(min_faults "${pids[@]}") - f0))
        switches=$(($(ctx_switches "${pids[@]}") - s0))
        ticks=$((c1 - c0))
        rss=$(peak_rss_kib "${pids[@]}")
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$kind" \
        "$payload" "$conns" "$target" "$requests" "$duration" "$p50" "$p99" "$econn" "$eread" \
        "$ewrite" "$estatus" "$etimeout" "$ticks" "$rss" "$faults" "$switches" >>"$RESULTS"
    local rps=$((requests * 1000000 / (duration > 0 ? duration : 1)))
    local cpu_note=""
    if [[ -n $ticks ]] && ((requests > 0)); then
        cpu_note=" cpu=$((ticks * 1000000 / (CLK_TCK * requests)))us/req rss=$((rss / 1024))MiB"
        # Minor faults and context switches per 1000 requests, as in the report.
        cpu_note+=" flt,cs/kreq=$((faults * 1000 / requests)),$((switches * 1000 / requests))"
    fi
    log "r$round $kind $payload c=$conns $target: $rps req/s p50=${p50}us p99=${p99}us errors=$((econn + eread + ewrite + estatus + etimeout))$cpu_note"
    local overflows=$(($(listen_overflows) - ${overflows0:-0}))
    if ((overflows > 0)); then
        OVERFLOWS+=("r$round $kind $payload c=$conns $target: $overflows")
        log "warning: $overflows connections dropped by a full listen queue (TcpExtListenOverflows) during this measurement"
    fi
}

# Idle CPU: ticks and context switches of each proxy over one IDLE_SECS window with no
# traffic (all proxies in the same window).
IDLE_LINES=()
measure_idle() {
    local when=$1 target
    local -a pids
    local -A c0=() s0=()
    for target in $TARGETS; do
        [[ $target == direct || $target == nginx-log ]] && continue
        read -r -a pids <<<"$(target_pids "$target")"
        c0[$target]=$(cpu_ticks "${pids[@]}")
        s0[$target]=$(ctx_switches "${pids[@]}")
    done
    sleep "$IDLE_SECS"
    for target in $TARGETS; do
        [[ $target == direct || $target == nginx-log ]] && continue
        read -r -a pids <<<"$(target_pids "$target")"
        local label=$target
        if [[ $target == floor ]]; then
            label="floor (${#pids[@]} processes)"
        fi
        IDLE_LINES+=("| $label | $when | $IDLE_SECS s | $((($(cpu_ticks "${pids[@]}") - c0[$target]) * 1000 / CLK_TCK)) ms | $(($(ctx_switches "${pids[@]}") - s0[$target])) |")
    done
}

# What runs tokengate's work under the affinity mask: thread names and counts (tokio's
# current-thread runtime runs everything on the main thread, named after the binary).
threads_line() {
    local pid=${PIDS[tokengate]:-} t comm
    [[ -n $pid ]] || return 0
    local -A names=()
    for t in /proc/"$pid"/task/*; do
        read -r comm <"$t/comm"
        names[$comm]=$((${names[$comm]:-0} + 1))
    done
    local list=""
    for comm in "${!names[@]}"; do
        list+="${list:+, }$comm × ${names[$comm]}"
    done
    echo "tokengate under \`taskset -c $PROXY_CPU\` (affinity $(taskset -pc "$pid" | sed 's/.*: //')) runs these threads: $list"
}

conns_for() {
    case $1 in
    post) echo "$CONNS_POST" ;;
    big) echo "$CONNS_BIG" ;;
    *) echo "$CONNS" ;;
    esac
}

# The payloads measured with an upstream kind: all of PAYLOADS, but for h2 only those also
# in H2_PAYLOADS.
payloads_for() {
    local kind=$1 p out=()
    for p in $PAYLOADS; do
        if [[ $kind == h2 && " $H2_PAYLOADS " != *" $p "* ]]; then
            continue
        fi
        out+=("$p")
    done
    echo "${out[*]}"
}

# The targets measured in a cell: the *-log ones only for LOG_PAYLOADS, and with the h2
# upstream only those that can speak h2 to it (nginx cannot proxy over h2) and direct.
targets_for() {
    local kind=$1 payload=$2 t out=()
    for t in $TARGETS; do
        if [[ $t == *-log && " $LOG_PAYLOADS " != *" $payload "* ]]; then
            continue
        fi
        if [[ $kind == h2 && " direct tokengate floor tg-compare " != *" $t "* ]]; then
            continue
        fi
        out+=("$t")
    done
    echo "${out[*]}"
}

STARTED_AT=$(date -u '+%Y-%m-%d %H:%M UTC')
SECONDS=0
start_proxies
sanity_check
THREADS_LINE=$(threads_line)
log "$THREADS_LINE"
log "idle CPU after start (${IDLE_SECS}s)"
measure_idle "after start"

cell=0
for ((round = 1; round <= ROUNDS; round++)); do
    for kind in $UPSTREAMS; do
        for payload in $(payloads_for "$kind"); do
            # Fresh proxies for every group, so each peak RSS starts from a new process (and
            # each restart is one more start-to-ready sample).
            if ((cell > 0)); then
                stop_proxies
                start_proxies
            fi
            read -r -a targets <<<"$(targets_for "$kind" "$payload")"
            for conns in $(conns_for "$payload"); do
                n=${#targets[@]}
                for ((k = 0; k < n; k++)); do
                    measure "$round" "$kind" "$payload" "$conns" "${targets[$(((k + cell + round) % n))]}"
                done
                cell=$((cell + 1))
            done
        done
    done
done
log "idle CPU after load (pooled connections open)"
measure_idle "after load"
ELAPSED=$SECONDS

# --- report -------------------------------------------------------------------------------

cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
nginx_version=$("$NGINX" -v 2>&1 | sed 's/^nginx version: nginx.//')
# wrk -v prints its version and usage, and exits 1.
wrk_version=$({ wrk -v 2>&1 || true; } | head -1 | cut -d' ' -f1-2)
tg_version=$("$TG_BIN" --version)
start_report=$(printf '%s\n' "${START_SAMPLES[@]}" | awk '
    { v[$1] = v[$1] " " $2 / 1000 }
    END {
        for (k in v) {
            n = split(v[k], a, " ")
            for (i = 2; i <= n; i++) { x = a[i]; j = i - 1; while (j > 0 && a[j] > x) { a[j + 1] = a[j]; j-- } a[j + 1] = x }
            med = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
            printf "| %s | %d | %.1f ms | %.1f ms | %.1f ms |\n", k, n, a[1], med, a[n]
        }
    }' | sort)

{
    echo "# tokengate benchmark results"
    echo
    echo "Produced by \`bench/run.sh\` (see [README.md](README.md) for the method)."
    echo
    echo "- Date: $STARTED_AT; the run took $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
    echo "- Machine: $NCPU CPUs, $cpu_model; $(uname -sr); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- Software: $tg_version ($TG_BIN), nginx $nginx_version, $wrk_version"
    echo "- Command: \`$COMMAND_LINE\`"
    echo "- Setup: each proxy pinned to CPU $PROXY_CPU (\`taskset -c $PROXY_CPU\`); wrk (one thread) and the upstream nginx (one worker) on CPU $LOAD_CPU; ${DURATION} s per measurement after ${WARMUP} s of warm-up; $ROUNDS round(s), target order rotated per cell and round; loopback only; the HTTPS upstream offers HTTP/1.1 only on its \`tls\` port and h2 as well on its \`h2\` port"
    echo "- $THREADS_LINE"
    if ((!HWM_RESET)); then
        echo "- Peak RSS could not be reset per measurement: it is the peak since each group's start"
    fi
    echo
    # report.awk prints this line in its Targets section, before the count line that ends it.
    if ((${#OVERFLOWS[@]})); then
        overflow_line="- Connections dropped by a full listen queue (kernel \`TcpExtListenOverflows\`, warm-up included; clients wait 1 s, 3 s, 7 s for TCP to retry):"
        overflow_line+=$(printf '\n  - %s' "${OVERFLOWS[@]}")
    else
        overflow_line="- Connections dropped by a full listen queue (kernel \`TcpExtListenOverflows\`, warm-up included): none"
    fi
    BENCH_OVERFLOWS=$overflow_line awk -F'\t' -v clk="$CLK_TCK" -f "$ROOT/bench/report.awk" "$RESULTS"
    echo
    echo "## Start to ready"
    echo
    echo "From starting the process to \`/readyz\` answering 200 (every integration holds its first token from the local stand-in endpoint), one sample per (re)start. Target: < 100 ms."
    echo
    echo "| process | samples | min | median | max |"
    echo "|---|---|---|---|---|"
    echo "$start_report"
    echo
    echo "## Idle CPU"
    echo
    echo "CPU time and context switches (all threads) over an idle window with no traffic. Target: 0."
    echo
    echo "| proxy | when | window | CPU time | context switches |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${IDLE_LINES[@]}"
    if [[ -f $ROOT/bench/NOTES.md ]]; then
        # The hand-written analysis (profile, changes, misses), one heading level down.
        echo
        sed 's/^#/##/' "$ROOT/bench/NOTES.md"
    fi
} >"$W/RESULTS.md"

mkdir -p "$(dirname "$OUT")"
cp "$W/RESULTS.md" "$OUT"
cp "$RESULTS" "${OUT%.md}.tsv"
cat "$W/RESULTS.md"
log "wrote $OUT and ${OUT%.md}.tsv"
