#!/usr/bin/env bash
# End-to-end check of tokengate against a real, independently written OAuth 2.0 server.
#
#   curl ──http──▶ tokengate ──http + Bearer──▶ api.mjs ──introspection──▶ provider.mjs
#                      └──────── client_credentials (POST /token) ─────────────┘
#
# provider.mjs is oidc-provider (npm) with two clients, one per tokengate token_auth mode
# (client_secret_post and client_secret_basic), and 3-second access tokens. api.mjs is the
# upstream: it answers 200 {"ok":true} only to a token the provider says is active and meant
# for it. tokengate runs with both integrations; over ~10 s (more than three token lifetimes)
# we call each integration every 500 ms without any Authorization header and check that every
# call succeeded, that tokengate refreshed ahead of expiry (several distinct tokens, none ever
# refused by the API, a token count that fits the schedule rather than one per request), that
# it spoke the token endpoint's protocol as configured, leaked no secret or token, and exited
# 0 on SIGTERM.
#
# Usage: .ci/e2e/oidc.sh            (needs node >= 18, npm, curl; the npm registry for npm ci)
#   TOKENGATE_BIN     tokengate binary (default: <repo>/target/release/tokengate)
#   E2E_HARNESS_ONLY  =1: only install and check the provider + API, without tokengate
#   E2E_KEEP          =1: keep the work directory (configs and logs) after the run
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)   # this file lives at <repo>/.ci/e2e/oidc.sh
TOKENGATE_BIN=${TOKENGATE_BIN:-$REPO_ROOT/target/release/tokengate}
HARNESS_ONLY=${E2E_HARNESS_ONLY:-0}

TTL=3            # access token lifetime at the provider, seconds
REFRESH_AT=0.5   # tokengate's refresh_at; see the note where the config is written
CALLS=20         # calls per integration, one every INTERVAL: 20 × 0.5 s = 10 s > 3 lifetimes
INTERVAL=0.5
MIN_DISTINCT=3   # the upstream must see at least this many tokens per integration
READY_WAIT=30    # seconds to wait for tokengate's /readyz
CALLS_WAIT=25    # seconds the calls may take in all (normally ~11), should each one hang
STOP_WAIT=10     # seconds to wait for tokengate to exit after SIGTERM (shutdown_grace is 5s)

# oidc-provider's clients. Secrets are fresh every run, so finding one in tokengate's output
# means tokengate printed it.
CLIENT_POST=tokengate-e2e-post
CLIENT_BASIC=tokengate-e2e-basic
API_CLIENT=e2e-api
# The API's resource indicator (RFC 8707). It names the API, it is not an address: nothing
# connects to it (.invalid never resolves). tokengate must send it as resource=... (extra_params).
RESOURCE=https://api.e2e.invalid/

say() { printf '[oidc-e2e] %s\n' "$*"; }
die() { printf '[oidc-e2e] FAIL: %s\n' "$*" >&2; echo "oidc-e2e: 0 passed, 1 failed" >&2; exit 1; }

for tool in node npm curl; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH"
done
if [[ $HARNESS_ONLY != 1 ]]; then
  # Fail before installing anything when there is nothing to test.
  [[ -x $TOKENGATE_BIN ]] ||
    die "no tokengate binary at $TOKENGATE_BIN (cargo build --release, or set TOKENGATE_BIN)"
fi

# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$HERE/lib/common.sh"
e2e_setup oidc-e2e

# status code of a GET (000 when nothing answered), body into $1
http_get() { local out=$1; shift; hcurl -o "$out" -w '%{http_code}' "$@" 2>/dev/null || true; }



# Wait (bounded) for a server's port file; fail early if the server died.
wait_port_file() {
  local file=$1 pid=$2 name=$3 i
  for ((i = 0; i < 100; i++)); do   # 100 × 0.1 s
    [[ -s $file ]] && return 0
    kill -0 "$pid" 2>/dev/null || die "$name exited during startup"
    sleep 0.1
  done
  die "$name did not start listening within 10 s"
}

between() { (($1 >= $2 && $1 <= $3)); }

# --- 1. Node dependencies ------------------------------------------------------------------
# npm ci wipes node_modules, so skip it while the lockfile is unchanged since the last install.
cd "$HERE"
LOCK_SUM=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)
if [[ $(cat node_modules/.e2e-lock-sum 2>/dev/null || true) != "$LOCK_SUM" ]]; then
  say "npm ci (oidc-provider)"
  timeout 60 npm ci --no-audit --no-fund --loglevel=error --prefer-offline >"$WORK/npm.log" 2>&1 ||
    die "npm ci failed (see npm.log)"
  echo "$LOCK_SUM" >node_modules/.e2e-lock-sum
fi
say "oidc-provider $(node -p 'require("./node_modules/oidc-provider/package.json").version'), node $(node --version)"

# --- 2. Authorization server and upstream API -------------------------------------------
secret() { node -p 'require("crypto").randomBytes(24).toString("base64url")'; }
export E2E_SECRET E2E_SECRET_BASIC E2E_API_SECRET
E2E_SECRET=$(secret); E2E_SECRET_BASIC=$(secret); E2E_API_SECRET=$(secret)
export E2E_CLIENT_POST=$CLIENT_POST E2E_CLIENT_BASIC=$CLIENT_BASIC E2E_API_CLIENT=$API_CLIENT
export E2E_API_RESOURCE=$RESOURCE E2E_TOKEN_TTL=$TTL

# Both servers listen on port 0 and report the port the kernel gave them: no race.
E2E_PORT_FILE=$WORK/provider.port node provider.mjs >"$WORK/provider.log" 2>&1 &
PIDS+=($!)
wait_port_file "$WORK/provider.port" "${PIDS[-1]}" "oidc-provider"
PROVIDER=http://127.0.0.1:$(json "$WORK/provider.port" o.port)
TOKEN_URL=$PROVIDER/token

E2E_PORT_FILE=$WORK/api.port E2E_INTROSPECT_URL=$PROVIDER/token/introspection \
  node api.mjs >"$WORK/api.log" 2>&1 &
PIDS+=($!)
wait_port_file "$WORK/api.port" "${PIDS[-1]}" "upstream API"
API=http://127.0.0.1:$(json "$WORK/api.port" o.port)
say "oidc-provider at $PROVIDER, upstream API at $API"

# --- 3. Harness self-check -----------------------------------------------------------------
# Proves the provider and the API work together before tokengate is blamed for anything.
fetch_token() {  # fetch_token OUTFILE curl-auth-args... ; prints the access token
  local code
  code=$(hcurl -o "$1" -w '%{http_code}' "${@:2}" -d grant_type=client_credentials \
    --data-urlencode "resource=$RESOURCE" "$TOKEN_URL") || true
  [[ $code == 200 ]] || die "harness: token request answered $code: $(cat "$1")"
  json "$1" o.access_token
}
PRE_POST=$(fetch_token "$WORK/pre-post.json" -d "client_id=$CLIENT_POST" --data-urlencode "client_secret=$E2E_SECRET")
PRE_BASIC=$(fetch_token "$WORK/pre-basic.json" -u "$CLIENT_BASIC:$E2E_SECRET_BASIC")
[[ $(json "$WORK/pre-post.json" o.expires_in) == "$TTL" ]] || die "harness: provider does not issue ${TTL}s tokens"
for tok in "$PRE_POST" "$PRE_BASIC"; do
  [[ $(http_get /dev/null -H "Authorization: Bearer $tok" "$API/harness-check") == 200 ]] ||
    die "harness: the API refused a fresh token (see api.log)"
done
[[ $(http_get /dev/null "$API/harness-check") == 401 ]] || die "harness: the API accepted a call without a token"
hcurl "$PROVIDER/__e2e/stats" >"$WORK/provider-before.json"
hcurl "$API/__e2e/stats" >"$WORK/api-before.json"
say "harness ok: both clients get ${TTL}s tokens, the API accepts them and refuses a call without one"

if [[ $HARNESS_ONLY == 1 ]]; then
  # The API must also refuse a token once the provider considers it expired.
  sleep "$TTL"
  [[ $(http_get /dev/null -H "Authorization: Bearer $PRE_POST" "$API/harness-check") == 401 ]] ||
    die "harness: the API still accepts a token after ${TTL}s"
  say "harness ok: a token is refused after ${TTL}s"
  FAILED=0; say "PASS (harness only; tokengate not run)"; exit 0
fi

# --- 4. tokengate configuration ------------------------------------------------------------
read -r ADMIN_PORT PORT_POST PORT_BASIC <<<"$(free_ports 3)"
ADMIN=http://127.0.0.1:$ADMIN_PORT
CONFIG=$WORK/tokengate.toml
# refresh_at = 0.5, not the default 0.8: oidc-provider keeps expiry in whole seconds
# (exp = floor(now) + ttl) while answering expires_in = 3, so a token really lives between
# 2 and 3 s. Refreshing after 0.8 × 3 s = 2.4 s would use expired tokens now and then, which
# exercises tokengate's 401 recovery, not its refresh schedule. 0.5 × 3 s (±5%) < 2 s.
cat >"$CONFIG" <<EOF
[server]
admin_listen = "127.0.0.1:$ADMIN_PORT"
shutdown_grace = "5s"

# token_auth left at its default ("body", i.e. client_secret_post)
[[integration]]
name = "e2e-post"
listen = "127.0.0.1:$PORT_POST"
token_url = "$TOKEN_URL"
upstream = "$API"
client_id = "$CLIENT_POST"
client_secret = { env = "E2E_SECRET" }
extra_params = { resource = "$RESOURCE" }
refresh_at = $REFRESH_AT

[[integration]]
name = "e2e-basic"
listen = "127.0.0.1:$PORT_BASIC"
token_url = "$TOKEN_URL"
upstream = "$API"
client_id = "$CLIENT_BASIC"
client_secret = { env = "E2E_SECRET_BASIC" }
token_auth = "basic"
extra_params = { resource = "$RESOURCE" }
refresh_at = $REFRESH_AT
EOF

# --- 5. Run tokengate ----------------------------------------------------------------------
TG_VERSION=$(timeout 10 "$TOKENGATE_BIN" --version 2>&1 | head -n 1) || true
say "tokengate: $TOKENGATE_BIN, --version: ${TG_VERSION:-(printed nothing)}"
now_ms() { date +%s%3N; }
START_MS=$(now_ms)
# No proxy variables: the contract lets HTTPS_PROXY/NO_PROXY steer tokengate's egress.
env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy -u ALL_PROXY -u all_proxy \
  -u TOKENGATE_CONFIG "$TOKENGATE_BIN" --config "$CONFIG" >"$WORK/tokengate.log" 2>&1 &
TG_PID=$!
PIDS+=("$TG_PID")

ready=0
while (($(now_ms) - START_MS < READY_WAIT * 1000)); do   # every 0.2 s, up to READY_WAIT
  if ! kill -0 "$TG_PID" 2>/dev/null; then
    rc=0; wait "$TG_PID" || rc=$?
    die "tokengate exited with status $rc before it was ready (see tokengate.log)"
  fi
  if [[ $(http_get "$WORK/readyz.json" "$ADMIN/readyz") == 200 ]]; then ready=1; break; fi
  sleep 0.2
done
((ready)) || die "tokengate's $ADMIN/readyz was not 200 within ${READY_WAIT}s: $(cat "$WORK/readyz.json" 2>/dev/null)"
say "tokengate ready after $(($(now_ms) - START_MS)) ms; calling each integration $CALLS times every ${INTERVAL}s"

# --- 6. Calls through tokengate --------------------------------------------------------------
declare -A PORT=([e2e-post]=$PORT_POST [e2e-basic]=$PORT_BASIC)
declare -A CLIENT=([e2e-post]=$CLIENT_POST [e2e-basic]=$CLIENT_BASIC)
declare -A METHOD=([e2e-post]=client_secret_post [e2e-basic]=client_secret_basic)
declare -A OK=([e2e-post]=0 [e2e-basic]=0)
declare -A BAD=([e2e-post]="" [e2e-basic]="")
CALLS_START_MS=$(now_ms)
for ((i = 1; i <= CALLS; i++)); do
  if (($(now_ms) - CALLS_START_MS > CALLS_WAIT * 1000)); then
    say "calls took over ${CALLS_WAIT}s; stopped after $((i - 1))"
    break
  fi
  for name in e2e-post e2e-basic; do
    # No Authorization header: adding one is tokengate's job.
    code=$(http_get "$WORK/body" "http://127.0.0.1:${PORT[$name]}/anything?call=$i")
    if [[ $code == 200 && $(cat "$WORK/body") == '{"ok":true}' ]]; then
      OK[$name]=$((OK[$name] + 1))
    else
      BAD[$name]+=" #$i:$code"
      say "$name call $i: $code $(head -c 200 "$WORK/body" 2>/dev/null)"
    fi
  done
  sleep "$INTERVAL"
done

# Snapshot everything before stopping tokengate; the time after the provider's count, so
# the count can only be low for the time, never high.
hcurl "$PROVIDER/__e2e/stats" >"$WORK/provider-after.json"
ELAPSED_MS=$(($(now_ms) - START_MS))
hcurl "$API/__e2e/stats" >"$WORK/api-after.json"
http_get "$WORK/status.json" "$ADMIN/status" >/dev/null
http_get "$WORK/metrics.txt" "$ADMIN/metrics" >/dev/null
# The harness's own token is now > 3 lifetimes old: the API must refuse it, or "distinct
# tokens" would prove nothing.
EXPIRED_CODE=$(http_get /dev/null -H "Authorization: Bearer $PRE_POST" "$API/harness-check")

# For the record: tokengate's own view of its refreshes (non-zero counters only).
grep -E '^tokengate_(token_refreshes|unauthorized_replays)_total\{' "$WORK/metrics.txt" 2>/dev/null |
  grep -v ' 0$' | sed 's/^/[oidc-e2e] metric /' || true

# --- 7. SIGTERM ----------------------------------------------------------------------------
kill -TERM "$TG_PID"
for ((i = 0; i < STOP_WAIT * 10; i++)); do kill -0 "$TG_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$TG_PID" 2>/dev/null; then
  TG_RC="still running after ${STOP_WAIT}s"
else
  TG_RC=0; wait "$TG_PID" || TG_RC=$?
fi

# --- 8. Verdict ------------------------------------------------------------------------------
echo
say "elapsed from tokengate start to the end of the calls: ${ELAPSED_MS} ms"
# Upper bound for tokens one integration may fetch: one at start, then one per scheduled
# refresh, which comes no sooner than refresh_at × ttl × 0.95 (jitter), plus two spare for
# timing. Over ~11 s that is about 10, half the calls; fetching per request would need $CALLS+.
MAX_ISSUED=$(node -p "Math.floor($ELAPSED_MS / 1000 / ($REFRESH_AT * $TTL * 0.95)) + 3")
for name in e2e-post e2e-basic; do
  c=${CLIENT[$name]}
  issued=$(($(json "$WORK/provider-after.json" "o.issued['$c'] ?? 0") - $(json "$WORK/provider-before.json" "o.issued['$c'] ?? 0")))
  # Tokens the API accepted for this client, less the harness self-check's own.
  distinct=$(json "$WORK/api-after.json" "(o.tokens['$c'] ?? []).filter(t => t !== '$PRE_POST' && t !== '$PRE_BASIC').length")
  methods=$(json "$WORK/provider-after.json" "Object.keys(o.requests['$c'].auth_methods).sort().join(',')")
  agents=$(json "$WORK/provider-after.json" "Object.keys(o.requests['$c'].user_agents).filter(a => !a.startsWith('curl/')).join(',')")
  accepts=$(json "$WORK/provider-after.json" "Object.keys(o.requests['$c'].accept).filter(a => a !== '*/*').join(',')")
  resources=$(json "$WORK/provider-after.json" "Object.keys(o.requests['$c'].resources).join(',')")
  refused=$(json "$WORK/provider-after.json" "o.errors.filter(e => e.client_id === '$c').length")
  say "$name: calls ok ${OK[$name]}/$CALLS; distinct tokens at upstream $distinct; tokens issued $issued (expected $MIN_DISTINCT..$MAX_ISSUED); token requests refused $refused"
  say "$name: token requests used auth [$methods], User-Agent [$agents], Accept [$accepts], resource [$resources]"
  check "$name: every call through tokengate got 200 {\"ok\":true} from the upstream${BAD[$name]:+ (failed:${BAD[$name]})}" \
    test "${OK[$name]}" -eq "$CALLS"
  check "$name: the upstream saw at least $MIN_DISTINCT distinct tokens ($distinct)" test "$distinct" -ge "$MIN_DISTINCT"
  check "$name: tokens issued ($issued) fit a refresh schedule ($MIN_DISTINCT..$MAX_ISSUED), not one per request" \
    between "$issued" "$MIN_DISTINCT" "$MAX_ISSUED"
  check "$name: the provider refused no token request ($refused)" test "$refused" -eq 0
  check "$name: client authenticated with ${METHOD[$name]} only ([$methods])" \
    test "$methods" = "${METHOD[$name]}"
  # shellcheck disable=SC2016 # single quotes on purpose: eval expands them inside check
  check "$name: token requests sent User-Agent tokengate/<version> ([$agents])" \
    eval '[[ -n $agents && $agents == tokengate/* && $agents != *,* ]]'
  # shellcheck disable=SC2016 # single quotes on purpose: eval expands them inside check
  check "$name: token requests sent Accept: application/json ([$accepts])" \
    eval '[[ $accepts == *application/json* ]]'
  check "$name: token requests carried resource=$RESOURCE from extra_params ([$resources])" \
    test "$resources" = "$RESOURCE"
done

rejected=$(($(json "$WORK/api-after.json" o.rejected) - $(json "$WORK/api-before.json" o.rejected)))
check "the upstream refused no token sent by tokengate ($rejected; reasons $(json "$WORK/api-after.json" o.reasons)): tokens were refreshed before they expired" \
  test "$rejected" -eq 0
check "the upstream refuses an expired token (harness: got $EXPIRED_CODE)" test "$EXPIRED_CODE" = 401

# Secrets and tokens must never be printed (contract, Security).
LEAK_PATTERNS=$WORK/leak-patterns
{ printf '%s\n' "$E2E_SECRET" "$E2E_SECRET_BASIC"; json "$WORK/api-after.json" "Object.values(o.tokens).flat().join('\n')"; } |
  grep -v '^$' >"$LEAK_PATTERNS"   # an empty pattern would match every line
for f in tokengate.log status.json metrics.txt; do
  if [[ -f $WORK/$f ]]; then
    check "no client secret or access token in tokengate's $f" eval "! grep -qF -f '$LEAK_PATTERNS' '$WORK/$f'"
  else
    check "tokengate's $f could be read" false
  fi
done
check "tokengate exited 0 after SIGTERM (exit: $TG_RC)" test "$TG_RC" = 0

echo
say "oidc-provider $(node -p 'require("./node_modules/oidc-provider/package.json").version'), token ttl ${TTL}s, refresh_at $REFRESH_AT, $CALLS calls per integration"
e2e_finish
