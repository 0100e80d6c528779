#!/usr/bin/env bash
# End-to-end check of tokengate's egress through a real forward proxy: Debian's tinyproxy,
# with basic auth, in front of a real OAuth server and TLS upstreams.
#
#   curl ─http─▶ tokengate ═CONNECT═▶ tinyproxy ──TLS (end to end)──▶ oidc-provider  (token, "oidc")
#                                          ├─────────TLS───────────▶ api.mjs        (API, "oidc")
#                                          └─────────TLS───────────▶ stand-in hub   (token + API, "standin")
#
# tokengate never proxies plain-http loopback destinations (tests and the demo stay local),
# so everything here speaks TLS with a CA made by openssl for this run: oidc-provider and
# api.mjs (both from oidc.sh) serve HTTPS when given E2E_TLS_CERT/E2E_TLS_KEY, and the
# stand-in (examples/standin.rs) takes --tls-cert/--tls-key. tinyproxy runs in the
# foreground on 127.0.0.1 with a scratch config (BasicAuth, ConnectPort for exactly the three
# destinations, its log at Info level); nothing is installed as a service.
#
# Checks: `check` shows both endpoints of both integrations going through the proxy; calls
# through both integrations succeed; tinyproxy's own log shows CONNECT to the token endpoint,
# the API and the stand-in, each authorized; `check --fetch` with a wrong proxy password
# reports tinyproxy's 407; a SIGHUP with a wrong password makes calls fail with 502
# upstream_unreachable naming the proxy and 407 (kind="proxy"), and one with the right
# password again makes them succeed; no secret in tokengate's output; exit 0 on SIGTERM.
#
# Usage: .ci/e2e/tinyproxy.sh  (needs node >= 18, npm, curl, openssl; tinyproxy, installed
#                               from Debian's tinyproxy-bin when missing; a release build)
#   TOKENGATE_BIN  tokengate binary (default: <repo>/target/release/tokengate)
#   STANDIN_BIN    stand-in binary (default: <repo>/target/release/examples/standin)
#   E2E_KEEP       =1: keep the work directory (configs and logs) after the run
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
TOKENGATE_BIN=${TOKENGATE_BIN:-$REPO_ROOT/target/release/tokengate}
STANDIN_BIN=${STANDIN_BIN:-$REPO_ROOT/target/release/examples/standin}

CALLS=5          # calls per integration through the proxy
TTL=30           # token lifetime at oidc-provider; this script is about the path, not refresh
READY_WAIT=30    # seconds for tokengate's /readyz
STOP_WAIT=10     # seconds for tokengate to exit after SIGTERM
RELOAD_WAIT=10   # seconds for a SIGHUP to be applied

CLIENT=tokengate-e2e-proxy
CLIENT_BASIC=tokengate-e2e-unused
API_CLIENT=e2e-api
RESOURCE=https://api.e2e.invalid/
PROXY_USER=tg-egress
# Fresh every run: finding it in tokengate's output means tokengate printed it.
PROXY_PASS=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')

say() { printf '[tinyproxy-e2e] %s\n' "$*"; }
die() { printf '[tinyproxy-e2e] FAIL: %s\n' "$*" >&2; echo "tinyproxy-e2e: 0 passed, 1 failed" >&2; exit 1; }

for tool in node npm curl openssl; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH"
done
[[ -x $TOKENGATE_BIN ]] || die "no tokengate binary at $TOKENGATE_BIN (cargo build --release)"
[[ -x $STANDIN_BIN ]] ||
  die "no stand-in at $STANDIN_BIN (cargo build --release --example standin, or set STANDIN_BIN)"

# --- 0. tinyproxy --------------------------------------------------------------------------
# Debian's tinyproxy-bin is the executable alone: no service is installed or started.
if ! command -v tinyproxy >/dev/null; then
  say "installing Debian's tinyproxy-bin"
  SUDO=()
  if [[ $(id -u) != 0 ]]; then SUDO=(sudo -n); fi
  export DEBIAN_FRONTEND=noninteractive
  timeout 180 "${SUDO[@]}" apt-get update -qq >/dev/null || die "apt-get update failed"
  timeout 180 "${SUDO[@]}" apt-get install -y -qq --no-install-recommends tinyproxy-bin >/dev/null ||
    die "apt-get install tinyproxy-bin failed"
fi
TINYPROXY=$(command -v tinyproxy) || die "tinyproxy is not on PATH after installing it"

# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$HERE/lib/common.sh"
e2e_setup tinyproxy-e2e

# Status code of a request (000 when nothing answered), body into $1.
http_code() { local out=$1; shift; hcurl -o "$out" -w '%{http_code}' "$@" 2>/dev/null || true; }



wait_file() {  # wait_file FILE PID NAME: until FILE is non-empty, failing early if PID died
  local file=$1 pid=$2 name=$3 i
  for ((i = 0; i < 100; i++)); do   # 100 × 0.1 s
    [[ -s $file ]] && return 0
    kill -0 "$pid" 2>/dev/null || die "$name exited during startup"
    sleep 0.1
  done
  die "$name did not start within 10 s"
}

wait_listening() {  # wait_listening PORT PID NAME
  local port=$1 pid=$2 name=$3 i
  for ((i = 0; i < 100; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || die "$name exited during startup"
    sleep 0.1
  done
  die "$name did not listen on $port within 10 s"
}

count() { grep -acF -- "$1" "$2" 2>/dev/null || true; }   # count LITERAL FILE

# tinyproxy keeps writing at its own offset, so its log is never truncated: a mark is its size
# at a moment, and `since MARK` what it logged after that.
mark() { stat -c %s "$TP_LOG"; }
since() { tail -c "+$(($1 + 1))" "$TP_LOG"; }
count_since() { since "$1" | grep -acF -- "$2" || true; }   # count_since MARK LITERAL


# --- 1. A CA and a certificate for localhost -------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=tokengate tinyproxy-e2e CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  >"$WORK/openssl.log" 2>&1 || die "openssl: cannot make the CA (see openssl.log)"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$WORK/server.key" -out "$WORK/server.csr" >>"$WORK/openssl.log" 2>&1 ||
  die "openssl: cannot make the server key (see openssl.log)"
printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
  "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$WORK/server.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
  -CAcreateserial -days 2 -extfile "$WORK/server.ext" -out "$WORK/server.pem" \
  >>"$WORK/openssl.log" 2>&1 || die "openssl: cannot sign the server certificate (see openssl.log)"

# --- 2. The destinations ---------------------------------------------------------------------
cd "$HERE"
LOCK_SUM=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)
if [[ $(cat node_modules/.e2e-lock-sum 2>/dev/null || true) != "$LOCK_SUM" ]]; then
  say "npm ci (oidc-provider)"
  timeout 60 npm ci --no-audit --no-fund --loglevel=error --prefer-offline >"$WORK/npm.log" 2>&1 ||
    die "npm ci failed (see npm.log)"
  echo "$LOCK_SUM" >node_modules/.e2e-lock-sum
fi

secret() { node -p 'require("crypto").randomBytes(24).toString("base64url")'; }
export E2E_SECRET E2E_SECRET_BASIC E2E_API_SECRET
E2E_SECRET=$(secret); E2E_SECRET_BASIC=$(secret); E2E_API_SECRET=$(secret)
export E2E_CLIENT_POST=$CLIENT E2E_CLIENT_BASIC=$CLIENT_BASIC E2E_API_CLIENT=$API_CLIENT
export E2E_API_RESOURCE=$RESOURCE E2E_TOKEN_TTL=$TTL
export E2E_TLS_CERT=$WORK/server.pem E2E_TLS_KEY=$WORK/server.key

# No proxy variables for anything started here: only tokengate's own config points at the proxy.
unset HTTPS_PROXY https_proxy HTTP_PROXY http_proxy ALL_PROXY all_proxy NO_PROXY no_proxy

E2E_PORT_FILE=$WORK/provider.port node provider.mjs >"$WORK/provider.log" 2>&1 &
PIDS+=("$!")
wait_file "$WORK/provider.port" "${PIDS[-1]}" "oidc-provider"
PROVIDER_PORT=$(json "$WORK/provider.port" o.port)
PROVIDER=https://localhost:$PROVIDER_PORT

# api.mjs introspects at the provider directly (not through the proxy), trusting our CA.
NODE_EXTRA_CA_CERTS=$WORK/ca.pem E2E_PORT_FILE=$WORK/api.port \
  E2E_INTROSPECT_URL=$PROVIDER/token/introspection node api.mjs >"$WORK/api.log" 2>&1 &
PIDS+=("$!")
wait_file "$WORK/api.port" "${PIDS[-1]}" "upstream API"
API_PORT=$(json "$WORK/api.port" o.port)
API=https://localhost:$API_PORT

"$STANDIN_BIN" --port 0 --lifetime-secs 3600 --tls-cert "$WORK/server.pem" \
  --tls-key "$WORK/server.key" >"$WORK/standin.url" 2>"$WORK/standin.log" &
PIDS+=("$!")
wait_file "$WORK/standin.url" "${PIDS[-1]}" "stand-in"
STANDIN=$(head -n 1 "$WORK/standin.url")
STANDIN_PORT=${STANDIN##*:}
[[ $STANDIN == "https://localhost:$STANDIN_PORT" ]] || die "unexpected stand-in URL: $STANDIN"
say "oidc-provider $PROVIDER, API $API, stand-in $STANDIN (all TLS, CA of this run)"

# Harness self-check, directly (no proxy): a token over TLS, accepted by the API.
code=$(http_code "$WORK/pre.json" --cacert "$WORK/ca.pem" -d grant_type=client_credentials \
  -d "client_id=$CLIENT" --data-urlencode "client_secret=$E2E_SECRET" \
  --data-urlencode "resource=$RESOURCE" "$PROVIDER/token")
[[ $code == 200 ]] || die "harness: token request over TLS answered $code: $(cat "$WORK/pre.json")"
PRE_TOKEN=$(json "$WORK/pre.json" o.access_token)
[[ $(http_code /dev/null --cacert "$WORK/ca.pem" -H "Authorization: Bearer $PRE_TOKEN" "$API/harness") == 200 ]] ||
  die "harness: the API refused a fresh token (see api.log)"

# --- 3. tinyproxy ----------------------------------------------------------------------------
read -r PROXY_PORT ADMIN_PORT PORT_OIDC PORT_STANDIN <<<"$(free_ports 4)"
PROXY=http://127.0.0.1:$PROXY_PORT
TP_LOG=$WORK/tinyproxy.log
cat >"$WORK/tinyproxy.conf" <<EOF
Port $PROXY_PORT
Listen 127.0.0.1
Timeout 30
MaxClients 50
LogFile "$TP_LOG"
LogLevel Info
DisableViaHeader Yes
BasicAuth $PROXY_USER $PROXY_PASS
# CONNECT only to the three destinations of this run.
ConnectPort $PROVIDER_PORT
ConnectPort $API_PORT
ConnectPort $STANDIN_PORT
EOF
"$TINYPROXY" -d -c "$WORK/tinyproxy.conf" >"$WORK/tinyproxy-stdout.log" 2>&1 &
PIDS+=("$!")
wait_listening "$PROXY_PORT" "${PIDS[-1]}" "tinyproxy"
say "$("$TINYPROXY" -v 2>&1 | head -n 1) on $PROXY, basic auth user $PROXY_USER"

# Harness self-check of the proxy, with curl: it tunnels with the credentials, 407 without.
code=$(hcurl -o /dev/null -w '%{http_code}' --cacert "$WORK/ca.pem" --noproxy '' \
  --proxy "$PROXY" --proxy-user "$PROXY_USER:$PROXY_PASS" "$STANDIN/harness" 2>/dev/null || true)
[[ $code =~ ^[1-5][0-9][0-9]$ && $code != 407 ]] || die "harness: curl through tinyproxy got $code"
code=$(hcurl -o /dev/null -w '%{http_connect}' --cacert "$WORK/ca.pem" --noproxy '' \
  --proxy "$PROXY" "$STANDIN/harness" 2>/dev/null || true)
[[ $code == 407 ]] || die "harness: tinyproxy without credentials answered CONNECT with $code, not 407"
say "harness ok: TLS destinations work directly and through tinyproxy; tinyproxy demands credentials"

# --- 4. tokengate ----------------------------------------------------------------------------
AUTH_FILE=$WORK/proxy-auth
printf '%s:%s\n' "$PROXY_USER" "$PROXY_PASS" >"$AUTH_FILE"
CONFIG=$WORK/tokengate.toml
cat >"$CONFIG" <<EOF
[server]
admin_listen = "127.0.0.1:$ADMIN_PORT"
shutdown_grace = "5s"
egress_proxy = "$PROXY"
egress_proxy_auth = { file = "$AUTH_FILE" }

[defaults]
ca_file = "$WORK/ca.pem"

# The real OAuth server and its API, both over TLS through tinyproxy.
[[integration]]
name = "oidc"
listen = "127.0.0.1:$PORT_OIDC"
token_url = "$PROVIDER/token"
upstream = "$API"
client_id = "$CLIENT"
client_secret = { env = "E2E_SECRET" }
extra_params = { resource = "$RESOURCE" }

# The stand-in, token endpoint and API on one TLS port, through tinyproxy.
[[integration]]
name = "standin"
listen = "127.0.0.1:$PORT_STANDIN"
token_url = "$STANDIN/oauth/token"
upstream = "$STANDIN"
client_id = "standin-client"
client_secret = { env = "E2E_SECRET_BASIC" }
EOF

tg() { env -u TOKENGATE_CONFIG "$TOKENGATE_BIN" "$@"; }

tg check --config "$CONFIG" >"$WORK/check.log" 2>&1 || die "tokengate check failed (see check.log)"
VIA="CONNECT via $PROXY (server.egress_proxy; credentials from file $AUTH_FILE)"
ROUTES=$(grep -cF -- "$VIA" "$WORK/check.log" || true)
check "tokengate check shows all four endpoints going through $PROXY with credentials from the file ($ROUTES of 4)" \
  test "$ROUTES" -eq 4

# Refused by the proxy, seen by `check --fetch`, which fetches exactly as the proxy does. No
# credentials: tinyproxy answers 407. A wrong password: tinyproxy 1.11 answers 401 (not 407),
# which is why tokengate reports the proxy's own status line rather than "refused".
grep -v '^egress_proxy_auth' "$CONFIG" >"$WORK/tokengate-noauth.toml"
rc=0; tg check --config "$WORK/tokengate-noauth.toml" --fetch >"$WORK/check-noauth.log" 2>&1 || rc=$?
check "check --fetch without proxy credentials exits 1 (exit: $rc)" test "$rc" -eq 1
check "check --fetch names the proxy and its 407 for both token endpoints" \
  test "$(count "egress proxy $PROXY answered 407 Proxy Authentication Required" "$WORK/check-noauth.log")" -eq 2
printf '%s:wrong-%s\n' "$PROXY_USER" "$PROXY_PASS" >"$WORK/proxy-auth-wrong"
sed "s|$AUTH_FILE|$WORK/proxy-auth-wrong|" "$CONFIG" >"$WORK/tokengate-wrong.toml"
rc=0; tg check --config "$WORK/tokengate-wrong.toml" --fetch >"$WORK/check-wrong.log" 2>&1 || rc=$?
check "check --fetch with a wrong proxy password exits 1 (exit: $rc)" test "$rc" -eq 1
check "check --fetch names the proxy and its answer to the wrong password (401) for both token endpoints" \
  test "$(count "egress proxy $PROXY answered 401 Unauthorized" "$WORK/check-wrong.log")" -eq 2

MAIN=$(mark)   # from here on, the CONNECTs in tinyproxy's log are the running tokengate's
START=$(date +%s)
# Not through the `tg` function: $! must be tokengate itself, for SIGHUP and SIGTERM.
env -u TOKENGATE_CONFIG "$TOKENGATE_BIN" --config "$CONFIG" >"$WORK/tokengate.log" 2>&1 &
TG_PID=$!
PIDS+=("$TG_PID")
ready=0
while (($(date +%s) - START < READY_WAIT)); do
  kill -0 "$TG_PID" 2>/dev/null || die "tokengate exited before it was ready (see tokengate.log)"
  if [[ $(http_code "$WORK/readyz.json" "http://127.0.0.1:$ADMIN_PORT/readyz") == 200 ]]; then ready=1; break; fi
  sleep 0.2
done
((ready)) || die "tokengate was not ready within ${READY_WAIT}s: $(cat "$WORK/readyz.json" 2>/dev/null)"
say "tokengate ready; calling each integration $CALLS times"

# --- 5. Calls through the proxy ----------------------------------------------------------
calls_ok() {  # calls_ok PORT N EXPECTED_BODY_SUBSTRING: prints how many of N calls got 200
  local port=$1 n=$2 want=$3 ok=0 i
  for ((i = 1; i <= n; i++)); do
    if [[ $(http_code "$WORK/body" "http://127.0.0.1:$port/v2/orders?call=$i") == 200 ]] &&
      grep -qF -- "$want" "$WORK/body"; then
      ok=$((ok + 1))
    fi
  done
  echo "$ok"
}
OK_OIDC=$(calls_ok "$PORT_OIDC" "$CALLS" '"ok":true')
OK_STANDIN=$(calls_ok "$PORT_STANDIN" "$CALLS" '/v2/orders')
check "oidc: $OK_OIDC of $CALLS calls through tokengate and tinyproxy got 200 from api.mjs" test "$OK_OIDC" -eq "$CALLS"
check "standin: $OK_STANDIN of $CALLS calls through tokengate and tinyproxy got 200 from the stand-in" test "$OK_STANDIN" -eq "$CALLS"

# tinyproxy's own log: "Request (file descriptor N): CONNECT host:port HTTP/1.1".
TO_PROVIDER=$(count_since "$MAIN" "CONNECT localhost:$PROVIDER_PORT HTTP/1.1")
TO_API=$(count_since "$MAIN" "CONNECT localhost:$API_PORT HTTP/1.1")
TO_STANDIN=$(count_since "$MAIN" "CONNECT localhost:$STANDIN_PORT HTTP/1.1")
ESTABLISHED=$(count_since "$MAIN" "Established connection to host")
say "tinyproxy log: CONNECT to the token endpoint $TO_PROVIDER, to the API $TO_API, to the stand-in $TO_STANDIN; established $ESTABLISHED"
since "$MAIN" | grep -aF -e "CONNECT localhost:" -e "Established" | sed 's/^/[tinyproxy-e2e]   tinyproxy: /' | head -n 12 || true
check "tinyproxy logged CONNECT to oidc-provider (token requests went through it: $TO_PROVIDER)" test "$TO_PROVIDER" -ge 1
check "tinyproxy logged CONNECT to api.mjs (API calls went through it: $TO_API)" test "$TO_API" -ge 1
check "tinyproxy logged at least two CONNECTs to the stand-in, token client and upstream pool ($TO_STANDIN)" test "$TO_STANDIN" -ge 2
check "every tokengate CONNECT was authorized and established ($ESTABLISHED of $((TO_PROVIDER + TO_API + TO_STANDIN)))" \
  test "$ESTABLISHED" -eq $((TO_PROVIDER + TO_API + TO_STANDIN))
hcurl "https://localhost:$PROVIDER_PORT/__e2e/stats" --cacert "$WORK/ca.pem" >"$WORK/provider-stats.json"
ISSUED=$(($(json "$WORK/provider-stats.json" "o.issued['$CLIENT'] ?? 0") - 1))   # less the harness's
check "oidc-provider issued tokengate $ISSUED token(s), fetched through the proxy" test "$ISSUED" -ge 1

# --- 6. Reload with a wrong, then the right proxy password --------------------------------
reloads() { count "configuration reloaded" "$WORK/tokengate.log"; }
sighup_and_wait() {
  local before i
  before=$(reloads)
  kill -HUP "$TG_PID"
  for ((i = 0; i < RELOAD_WAIT * 10; i++)); do
    (($(reloads) > before)) && return 0
    sleep 0.1
  done
  die "tokengate did not log a reload within ${RELOAD_WAIT}s"
}
printf '%s:wrong-%s\n' "$PROXY_USER" "$PROXY_PASS" >"$AUTH_FILE"
sighup_and_wait
code=$(http_code "$WORK/wrong.json" "http://127.0.0.1:$PORT_STANDIN/v2/orders?after=wrong-password")
say "after SIGHUP with a wrong password: HTTP $code $(head -c 500 "$WORK/wrong.json")"
check "a call after SIGHUP with a wrong proxy password gets 502: the new tunnel used the new secret (got $code)" \
  test "$code" = 502
check "its JSON is upstream_unreachable naming tinyproxy and its answer (401)" \
  eval "grep -qF '\"error\":\"upstream_unreachable\"' '$WORK/wrong.json' && grep -qF 'egress proxy $PROXY answered 401 Unauthorized' '$WORK/wrong.json'"
hcurl "http://127.0.0.1:$ADMIN_PORT/metrics" >"$WORK/metrics.txt" || true
PROXY_ERRORS=$(grep -F 'tokengate_upstream_errors_total{integration="standin",kind="proxy"}' "$WORK/metrics.txt" | awk '{print $2}')
check "tokengate_upstream_errors_total{kind=\"proxy\"} counted it (${PROXY_ERRORS:-absent})" test "${PROXY_ERRORS:-0}" -ge 1

printf '%s:%s\n' "$PROXY_USER" "$PROXY_PASS" >"$AUTH_FILE"
sighup_and_wait
code=$(http_code /dev/null "http://127.0.0.1:$PORT_STANDIN/v2/orders?after=right-password")
check "after SIGHUP with the right password again, calls get 200 (got $code)" test "$code" = 200
say "tinyproxy log for the running tokengate: $(count_since "$MAIN" "CONNECT localhost:$STANDIN_PORT HTTP/1.1") CONNECTs to the stand-in in all, $(count_since "$MAIN" "Established connection to host") tunnels established"

# --- 7. Secrets and SIGTERM ----------------------------------------------------------------
for f in tokengate.log check.log check-noauth.log check-wrong.log metrics.txt wrong.json; do
  check "no proxy password or client secret in tokengate's $f" \
    eval "! grep -qF -e '$PROXY_PASS' -e '$E2E_SECRET' -e '$E2E_SECRET_BASIC' '$WORK/$f'"
done
kill -TERM "$TG_PID"
for ((i = 0; i < STOP_WAIT * 10; i++)); do kill -0 "$TG_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$TG_PID" 2>/dev/null; then TG_RC="still running after ${STOP_WAIT}s"; else TG_RC=0; wait "$TG_PID" || TG_RC=$?; fi
check "tokengate exited 0 after SIGTERM (exit: $TG_RC)" test "$TG_RC" = 0

echo
e2e_finish
