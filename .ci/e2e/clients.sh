#!/usr/bin/env bash
# End-to-end check of the README's "Client recipes": independently written HTTP clients, in
# the languages legacy systems are written in, pointed at tokengate the way the README says,
# in base-URL mode and in proxy mode, and each documented trap shown to bite.
#
#   client ──http──▶ tokengate (release build) ──http + Bearer──▶ stand-in Delivery Hub
#     base URL:   GET/POST http://127.0.0.1:<tokengate>/v2/orders
#     proxy mode: GET http://127.0.0.1:<stand-in>/v2/orders through the proxy 127.0.0.1:<tokengate>
#
# The stand-in (examples/standin.rs) answers its API only for a token it issued, so a 200
# from its default route, whose JSON echo says `"token_ok": true`, proves the call went
# through tokengate and got the Bearer token; its `/echo-body` route sends the request body
# back, so a POST's JSON is compared as it arrived. A call that bypassed tokengate gets the
# stand-in's 401 `invalid_token`.
#
# Clients: curl and wget; Python requests, httpx and urllib.request (a venv); Node's fetch
# with undici's agents, and axios (npm ci of .ci/e2e/package.json); Java's HttpClient and
# HttpURLConnection (`java Clients.java`, no build tool); PHP's curl extension and Guzzle;
# Go's net/http; Ruby's Net::HTTP. Each program is in .ci/e2e/clients/ and writes one result file
# per call; this script judges them all. Missing tools are installed from Debian's packages.
#
# Usage: .ci/e2e/clients.sh   (after cargo build --release and --example standin; as root on
#                              a machine that lacks a client, for apt-get)
#   TOKENGATE_BIN      tokengate binary (default: <repo>/target/release/tokengate)
#   STANDIN_BIN        stand-in binary (default: <repo>/target/release/examples/standin)
#   TOKENGATE_CI_CACHE where the Python venv is kept between runs (default ~/.cache/tokengate-ci)
#   E2E_KEEP           =1: keep the work directory (config, logs, every client's result)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
TOKENGATE_BIN=${TOKENGATE_BIN:-$REPO_ROOT/target/release/tokengate}
STANDIN_BIN=${STANDIN_BIN:-$REPO_ROOT/target/release/examples/standin}
CLIENTS=$HERE/clients
REQUIREMENTS=$HERE/lib/clients-requirements.txt
CACHE_DIR=${TOKENGATE_CI_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tokengate-ci}

APT_WAIT=420     # seconds for apt-get update + install (a JDK is the big one)
PIP_WAIT=180     # seconds for the venv and pip install
NPM_WAIT=120     # seconds for npm ci
CLIENT_WAIT=120  # seconds for one language's program (Java compiles, Go builds)
READY_WAIT=30    # seconds for tokengate's /readyz
STOP_WAIT=10     # seconds for tokengate to exit after SIGTERM

say() { printf '[clients-e2e] %s\n' "$*"; }
die() { printf '[clients-e2e] FAIL: %s\n' "$*" >&2; echo "clients-e2e: 0 passed, 1 failed" >&2; exit 1; }

[[ -x $TOKENGATE_BIN ]] || die "no tokengate binary at $TOKENGATE_BIN (cargo build --release)"
[[ -x $STANDIN_BIN ]] ||
  die "no stand-in at $STANDIN_BIN (cargo build --release --example standin, or set STANDIN_BIN)"

# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$HERE/lib/common.sh"
e2e_setup clients-e2e
START_S=$(date +%s)

# --- 1. Tools: Debian's packages for whatever is missing, in one apt-get run ---------------
have_jdk() { command -v java >/dev/null && java --list-modules 2>/dev/null | grep -q '^jdk.compiler@'; }
have_php_curl() { command -v php >/dev/null && php -r 'exit(function_exists("curl_init") ? 0 : 1);'; }
GUZZLE=/usr/share/php/GuzzleHttp/autoload.php   # where Debian's php-guzzlehttp-guzzle puts it
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v wget >/dev/null || missing+=(wget)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
have_jdk || missing+=(default-jdk-headless)   # `java File.java` needs the compiler module
have_php_curl || missing+=(php-cli php-curl)
[[ -f $GUZZLE ]] || missing+=(php-guzzlehttp-guzzle)
command -v go >/dev/null || missing+=(golang-go)
command -v ruby >/dev/null || missing+=(ruby)
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; installing Debian's packages needs root"
  say "installing Debian packages: ${missing[*]}"
  # shellcheck disable=SC2016 # $@ is the inner shell's
  if ! timeout "$APT_WAIT" bash -c 'apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"' \
      apt "${missing[@]}" >"$WORK/apt.log" 2>&1; then
    tail -n 20 "$WORK/apt.log" >&2
    die "apt-get install ${missing[*]} failed"
  fi
fi
for tool in curl wget python3 node npm go ruby; do
  command -v "$tool" >/dev/null || die "$tool is still not on PATH"
done
have_jdk || die "java cannot run a source file (no jdk.compiler module)"
node -e 'const [a, b, c] = process.versions.node.split(".").map(Number);
  process.exit(a > 20 || (a === 20 && (b > 18 || (b === 18 && c >= 1))) ? 0 : 1)' ||
  die "node $(node --version) is too old: undici 7 needs Node.js 20.18.1 or later"
have_php_curl || die "php has no curl extension"
[[ -f $GUZZLE ]] || die "no Guzzle at $GUZZLE"

# Python clients, pinned, in a venv reused while the pins are the same.
PINS_HASH=$(sha256sum "$REQUIREMENTS" | cut -c1-16)
VENV=$CACHE_DIR/clients-venv-$PINS_HASH
if ! "$VENV/bin/python" -c 'import requests, httpx' 2>/dev/null; then
  say "installing requests and httpx into $VENV"
  rm -rf "$VENV"
  mkdir -p "$CACHE_DIR"
  # shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
  if ! timeout "$PIP_WAIT" bash -c 'python3 -m venv "$1" &&
      "$1/bin/pip" install -q --disable-pip-version-check --no-input -r "$2"' \
      venv "$VENV" "$REQUIREMENTS" >"$WORK/pip.log" 2>&1; then
    tail -n 20 "$WORK/pip.log" >&2
    rm -rf "$VENV"
    die "pip install -r $REQUIREMENTS failed"
  fi
fi

# Node clients from the lockfile; npm ci wipes node_modules, so only when it changed (the
# same marker as oidc.sh and tinyproxy.sh, which share this package.json).
cd "$HERE"
LOCK_SUM=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)
if [[ $(cat node_modules/.e2e-lock-sum 2>/dev/null || true) != "$LOCK_SUM" ]]; then
  say "npm ci (undici, axios)"
  timeout "$NPM_WAIT" npm ci --no-audit --no-fund --loglevel=error --prefer-offline >"$WORK/npm.log" 2>&1 ||
    die "npm ci failed (see npm.log)"
  echo "$LOCK_SUM" >node_modules/.e2e-lock-sum
fi
SETUP_S=$(($(date +%s) - START_S))
say "tools ready after ${SETUP_S}s"

# --- 2. The stand-in and tokengate -----------------------------------------------------------
# No proxy variables for anything started here: each scenario that reads them sets its own.
unset HTTPS_PROXY https_proxy HTTP_PROXY http_proxy ALL_PROXY all_proxy NO_PROXY no_proxy

wait_file() {  # wait_file FILE PID NAME: until FILE is non-empty, failing early if PID died
  local file=$1 pid=$2 name=$3 i
  for ((i = 0; i < 100; i++)); do   # 100 × 0.1 s
    [[ -s $file ]] && return 0
    kill -0 "$pid" 2>/dev/null || die "$name exited during startup"
    sleep 0.1
  done
  die "$name did not start within 10 s"
}

CLIENT_SECRET=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
"$STANDIN_BIN" --port 0 --client-id clients-e2e --client-secret="$CLIENT_SECRET" \
  >"$WORK/standin.url" 2>"$WORK/standin.log" &
PIDS+=("$!")
wait_file "$WORK/standin.url" "${PIDS[-1]}" "stand-in"
API=$(head -n 1 "$WORK/standin.url")
API_AUTHORITY=${API#http://}
[[ $API == http://127.0.0.1:* ]] || die "unexpected stand-in URL: $API"

# The harness: the stand-in refuses a call without a token, so a 200 below came through tokengate.
code=$(hcurl -o /dev/null -w '%{http_code}' "$API/v2/orders" || true)
[[ $code == 401 ]] || die "harness: the stand-in answered $code, not 401, to a call without a token"

# DEAD_PROXY: a port nothing listens on, standing for a corporate proxy in the environment.
read -r ADMIN_PORT TG_PORT DEAD_PORT <<<"$(free_ports 3)"
TG=http://127.0.0.1:$TG_PORT
ADMIN=http://127.0.0.1:$ADMIN_PORT
CONFIG=$WORK/tokengate.toml
cat >"$CONFIG" <<EOF
[server]
admin_listen = "127.0.0.1:$ADMIN_PORT"
shutdown_grace = "2s"

[[integration]]
name = "clients"
listen = "127.0.0.1:$TG_PORT"
token_url = "$API/oauth/token"
upstream = "$API"
client_id = "clients-e2e"
client_secret = { env = "E2E_CLIENT_SECRET" }
EOF
E2E_CLIENT_SECRET=$CLIENT_SECRET env -u TOKENGATE_CONFIG "$TOKENGATE_BIN" --config "$CONFIG" \
  >"$WORK/tokengate.log" 2>&1 &
TG_PID=$!
PIDS+=("$TG_PID")
for ((i = 0; i < READY_WAIT * 5; i++)); do   # every 0.2 s
  kill -0 "$TG_PID" 2>/dev/null || die "tokengate exited before it was ready (see tokengate.log)"
  [[ $(hcurl -o /dev/null -w '%{http_code}' "$ADMIN/readyz" 2>/dev/null || true) == 200 ]] && break
  sleep 0.2
done
((i < READY_WAIT * 5)) || die "tokengate was not ready within ${READY_WAIT}s (see tokengate.log)"
say "stand-in at $API; tokengate at $TG (base URL and proxy), admin $ADMIN"

# --- 3. The clients --------------------------------------------------------------------------
OUT=$WORK/results
mkdir -p "$OUT"
export TG_BASE=$TG TG_PROXY=$TG API OUT DEAD_PROXY=http://127.0.0.1:$DEAD_PORT

# Each language's program runs its scenarios and prints its versions; the timings go to the log.
run_program() {  # run_program NAME COMMAND...
  local name=$1 t0 rc=0
  shift
  t0=$(date +%s%3N)
  timeout "$CLIENT_WAIT" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  say "$name: $(tail -n 1 "$WORK/$name.log") ($(($(date +%s%3N) - t0)) ms, exit $rc)"
  ((rc == 0)) || check "$name program ran to its end (exit $rc; see $name.log)" false
}
run_program python "$VENV/bin/python" "$CLIENTS/clients.py"
run_program node node "$CLIENTS/clients.mjs"
run_program java java "$CLIENTS/Clients.java"
run_program php php "$CLIENTS/clients.php"
# GOPROXY=off: standard library only, nothing is ever downloaded; GOFLAGS cleared so no
# -mod flag from the environment applies to a file outside any module.
run_program go env GOPROXY=off GOFLAGS= GOTOOLCHAIN=local GOCACHE="$CACHE_DIR/go-build" \
  go run "$CLIENTS/clients.go"
run_program ruby ruby "$CLIENTS/clients.rb"

# curl and wget, written the same way. Leading NAME=VALUE arguments are the environment.
split_env() {  # sets ENVS (the leading NAME=VALUE arguments) and ARGS (the rest)
  ENVS=() ARGS=()
  while (($#)) && [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do ENVS+=("$1"); shift; done
  ARGS=("$@")
}
curl_call() {  # curl_call ID [NAME=VALUE...] CURL-ARGS...
  local id=$1 raw
  shift
  split_env "$@"
  raw=$(env "${ENVS[@]}" curl --silent --show-error --max-time 10 -w '\n%{http_code}' "${ARGS[@]}" \
    2>"$WORK/$id.stderr") || true
  printf '%s\n%s' "${raw##*$'\n'}" "${raw%$'\n'*}" >"$OUT/$id.txt"
}
wget_call() {  # wget_call ID [NAME=VALUE...] WGET-ARGS...; the status from --server-response
  local id=$1 status
  shift
  split_env "$@"
  env "${ENVS[@]}" wget -q --server-response --tries=1 --timeout=10 --content-on-error \
    -O "$WORK/$id.body" "${ARGS[@]}" 2>"$WORK/$id.stderr" || true
  status=$(grep -Eo '^ *HTTP/[0-9.]+ [0-9]{3}' "$WORK/$id.stderr" | tail -n 1 | awk '{print $2}')
  # wget keeps no body of a 401: its WWW-Authenticate goes on the status line instead.
  [[ $status != 401 ]] || status+=" $(grep -iEo 'www-authenticate: .*' "$WORK/$id.stderr" | tail -n 1)"
  printf '%s\n%s' "${status:-ERR (see $id.stderr)}" "$(cat "$WORK/$id.body" 2>/dev/null)" >"$OUT/$id.txt"
}
order() { printf '{"order":{"id":"%s","items":[1,2,3],"note":"%s"}}' "$1" "Zoë's café"; }
t0=$(date +%s%3N)
curl_call curl-base-get "$TG/v2/orders?client=curl-base-get"
curl_call curl-base-post --json "$(order curl-base-post)" "$TG/echo-body"
curl_call curl-proxy-get -x "$TG" "$API/v2/orders?client=curl-proxy-get"
curl_call curl-env-post "http_proxy=$TG" --json "$(order curl-env-post)" "$API/echo-body"
curl_call curl-env-upper-trap "HTTP_PROXY=$TG" "$API/v2/orders?client=curl-env-upper-trap"
wget_call wget-base-get "$TG/v2/orders?client=wget-base-get"
wget_call wget-base-post --header 'Content-Type: application/json' \
  --post-data "$(order wget-base-post)" "$TG/echo-body"
wget_call wget-env-get "http_proxy=$TG" "$API/v2/orders?client=wget-env-get"
wget_call wget-env-upper-trap "HTTP_PROXY=$TG" "$API/v2/orders?client=wget-env-upper-trap"
say "shell: $(curl --version | head -n 1 | cut -d' ' -f1-2), $(wget --version | head -n 1 | cut -d' ' -f1-3) ($(($(date +%s%3N) - t0)) ms)"

# --- 4. Judgement ----------------------------------------------------------------------------
# KIND ID DESCRIPTION. get: 200 from the API with tokengate's token, Host and X-Request-Id;
# post: the JSON body arrived intact; h2c: get, over HTTP/1.1 after Java's h2c offer, with
# no upgrade header passed on; bypass: the client went past tokengate (the stand-in's 401);
# connect: fetch failed because undici tunnelled; proxyerror: sent to the environment's proxy.
EXPECTATIONS=$(cat <<'EOF'
get        curl-base-get                      curl, base URL: GET
post       curl-base-post                     curl, base URL: POST --json
get        curl-proxy-get                     curl -x, proxy mode: GET
post       curl-env-post                      curl with http_proxy, proxy mode: POST --json
bypass     curl-env-upper-trap                trap: curl ignores upper-case HTTP_PROXY for http:// and calls the API directly
get        wget-base-get                      wget, base URL: GET
post       wget-base-post                     wget, base URL: POST --post-data
get        wget-env-get                       wget with http_proxy, proxy mode: GET
bypass     wget-env-upper-trap                trap: wget ignores upper-case HTTP_PROXY and calls the API directly
get        python-requests-base-get           Python requests Session, base URL: GET
post       python-requests-base-post          Python requests, base URL: POST json=
get        python-requests-proxy-get          Python requests proxies={"http": ...}, proxy mode: GET
post       python-requests-env-post           Python requests with HTTP_PROXY, proxy mode: POST json=
proxyerror python-requests-base-envproxy-trap trap: Python requests sends a base-URL call to 127.0.0.1 to the proxy in HTTP_PROXY
get        python-requests-base-noproxy-get   Python requests, base URL with HTTP_PROXY set and NO_PROXY=127.0.0.1: GET
get        python-httpx-base-get              Python httpx Client(base_url=...), base URL: GET
post       python-httpx-base-post             Python httpx, base URL: POST json=
post       python-httpx-proxy-post            Python httpx Client(proxy=...), proxy mode: POST json=
get        python-httpx-env-get               Python httpx with HTTP_PROXY, proxy mode: GET
get        python-urllib-base-get             Python urllib.request, base URL: GET
post       python-urllib-base-post            Python urllib.request, base URL: POST JSON
get        python-urllib-proxy-get            Python urllib.request ProxyHandler, proxy mode: GET
get        node-fetch-base-get                Node fetch, base URL: GET
post       node-fetch-base-post               Node fetch, base URL: POST JSON
get        node-fetch-proxy-get               Node fetch with undici ProxyAgent({ proxyTunnel: false }), proxy mode: GET
post       node-fetch-proxy-post              Node fetch with undici ProxyAgent({ proxyTunnel: false }), proxy mode: POST JSON
get        node-fetch-env-get                 Node fetch with undici EnvHttpProxyAgent({ proxyTunnel: false }) and HTTP_PROXY, proxy mode: GET
connect    node-fetch-tunnel-trap             trap: Node fetch with a default undici ProxyAgent tunnels with CONNECT and fails
connect    node-fetch-env-tunnel-trap         trap: Node fetch with a default undici EnvHttpProxyAgent tunnels with CONNECT and fails
get        node-axios-base-get                Node axios baseURL (proxy: false), base URL: GET
post       node-axios-base-post               Node axios, base URL: POST
get        node-axios-proxy-get               Node axios proxy option, proxy mode: GET
post       node-axios-proxy-post              Node axios proxy option, proxy mode: POST
get        node-axios-env-get                 Node axios with HTTP_PROXY, proxy mode: GET
h2c        java-httpclient-base-get           Java HttpClient (default, offers h2c), base URL: GET answered over HTTP/1.1
post       java-httpclient-base-post          Java HttpClient (HTTP_1_1), base URL: POST JSON
get        java-httpclient-proxy-get          Java HttpClient .proxy(ProxySelector.of(...)), proxy mode: GET
post       java-httpclient-proxy-post         Java HttpClient .proxy(ProxySelector.of(...)), proxy mode: POST JSON
bypass     java-httpclient-sysprops-trap      trap: Java HttpClient (no .proxy(...)) with http.proxyHost skips the proxy for loopback
get        java-httpclient-sysprops-get       Java HttpClient with http.proxyHost and http.nonProxyHosts= (empty), proxy mode: GET
get        java-urlconnection-base-get        Java HttpURLConnection, base URL: GET
post       java-urlconnection-base-post       Java HttpURLConnection, base URL: POST JSON
get        java-urlconnection-proxy-get       Java HttpURLConnection openConnection(Proxy), proxy mode: GET
bypass     java-urlconnection-sysprops-trap   trap: Java HttpURLConnection with http.proxyHost skips the proxy for loopback (http.nonProxyHosts default)
get        java-urlconnection-sysprops-get    Java HttpURLConnection with http.proxyHost and http.nonProxyHosts= (empty), proxy mode: GET
get        php-curl-base-get                  PHP curl, base URL: GET
post       php-curl-base-post                 PHP curl, base URL: POST JSON
get        php-curl-proxy-get                 PHP curl CURLOPT_PROXY, proxy mode: GET
post       php-curl-proxy-post                PHP curl CURLOPT_PROXY, proxy mode: POST JSON
get        php-guzzle-base-get                PHP Guzzle base_uri, base URL: GET
post       php-guzzle-base-post               PHP Guzzle, base URL: POST json
post       php-guzzle-proxy-post              PHP Guzzle proxy option, proxy mode: POST json
get        php-guzzle-env-get                 PHP Guzzle with HTTP_PROXY (command line), proxy mode: GET
get        go-base-get                        Go net/http, base URL: GET
post       go-base-post                       Go net/http, base URL: POST JSON
get        go-proxy-get                       Go net/http Transport{Proxy: http.ProxyURL(...)}, proxy mode: GET
post       go-proxy-post                      Go net/http Transport{Proxy: http.ProxyURL(...)}, proxy mode: POST JSON
bypass     go-env-loopback-trap               trap: Go http.ProxyFromEnvironment never proxies a loopback URL
get        ruby-base-get                      Ruby Net::HTTP, base URL: GET
post       ruby-base-post                     Ruby Net::HTTP, base URL: POST JSON
get        ruby-proxy-get                     Ruby Net::HTTP.new(host, port, proxy_host, proxy_port), proxy mode: GET
post       ruby-proxy-post                    Ruby Net::HTTP.new(host, port, proxy_host, proxy_port), proxy mode: POST JSON
bypass     ruby-env-loopback-trap             trap: Ruby Net::HTTP skips http_proxy for a host that resolves to 127.*
EOF
)
while IFS=$'\t' read -r verdict what; do
  check "$what" test "$verdict" = ok
done < <(node "$CLIENTS/judge.mjs" "$OUT" "$API_AUTHORITY" <<<"$EXPECTATIONS")

# tokengate's own count: every call meant for it arrived, the bypassing ones did not, and
# each CONNECT got 405.
hcurl "$ADMIN/metrics" >"$WORK/metrics.txt" || true
requests_total() {  # requests_total LABEL-REGEX...: tokengate_requests_total summed over matching series
  local series
  series=$(grep -E '^tokengate_requests_total\{' "$WORK/metrics.txt" || true)
  for re in "$@"; do series=$(grep -E -- "$re" <<<"$series" || true); done
  awk '{s += $NF} END {print s + 0}' <<<"$series"
}
VIA_TG=$(grep -cE '^(get|post|h2c) ' <<<"$EXPECTATIONS")
CONNECTS=$(grep -cE '^connect ' <<<"$EXPECTATIONS")
SERVED=$(requests_total 'code="2[0-9][0-9]"')
OTHER=$(requests_total 'code="[013-9][0-9][0-9]"')
CONNECT_405=$(requests_total 'method="CONNECT"' 'code="405"')
check "tokengate answered 2xx to exactly the $VIA_TG calls meant for it, so none of the bypassing calls reached it ($SERVED)" \
  test "$SERVED" -eq "$VIA_TG"
check "tokengate's only other answers were 405 to the $CONNECTS CONNECTs of the undici traps ($OTHER other, $CONNECT_405 CONNECT with 405)" \
  eval '((OTHER == CONNECTS && CONNECT_405 == CONNECTS))'

# --- 5. Secrets and SIGTERM ----------------------------------------------------------------
check "no client secret in tokengate's log or metrics" \
  eval "! grep -qF -e '$CLIENT_SECRET' '$WORK/tokengate.log' '$WORK/metrics.txt'"
kill -TERM "$TG_PID"
for ((i = 0; i < STOP_WAIT * 10; i++)); do kill -0 "$TG_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$TG_PID" 2>/dev/null; then TG_RC="still running after ${STOP_WAIT}s"; else TG_RC=0; wait "$TG_PID" || TG_RC=$?; fi
check "tokengate exited 0 after SIGTERM (exit: $TG_RC)" test "$TG_RC" = 0

echo
say "$(grep -c . <<<"$EXPECTATIONS") scenarios in $(($(date +%s) - START_S))s (tools and installs: ${SETUP_S}s)"
e2e_finish
