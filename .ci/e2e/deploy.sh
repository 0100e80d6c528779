#!/usr/bin/env bash
# Checks of tokengate's deployment artefacts (deploy/) with the real tools, offline:
#
#   deploy/kubernetes/{base,overlays/example,overlays/pre-1.29,overlays/fleet} ──kubectl kustomize──▶ YAML
#     ├─ kubernetes-validate (PyPI, pinned, in a venv): built-in kinds against the Kubernetes
#     │  1.29 and newest schemas, strict; pre-1.29 also against 1.25; PodMonitor and
#     │  PrometheusRule: their required fields (lib/deploy_checks.py)
#     ├─ shape: native sidecar (init container, restartPolicy Always, startupProbe /readyz)
#     │  in base, example and fleet, an ordinary container in pre-1.29; probes,
#     │  securityContext, resources, scraping, Secret directory mounts
#     ├─ fleet: base's tokengate.toml plus [fleet], redis_url from a Secret, replicas, a
#     │  NetworkPolicy to Redis, DNS and HTTPS
#     ├─ the ConfigMap's tokengate.toml ──▶ `tokengate check` with placeholder secret files
#     │  (and placeholder environment variables from secretKeyRefs); fleet's is SKIPped while
#     │  the binary predates fleet mode (rejects the [fleet] key as unknown)
#     ├─ the PrometheusRule's groups ──▶ `promtool check rules`; equal to the operations
#     │  script's rule file (.ci/e2e/prometheus-alerts.yml); the dashboard's queries parse;
#     │  `promtool test rules` on the fleet alerts (lib/prometheus-alerts-test.yml)
#     └─ every metric the dashboard and alerts name is one tokengate registers in
#        src/telemetry.rs (tokengate_fleet_* SKIPped while the binary predates fleet mode)
#   deploy/systemd ──▶ `systemd-analyze verify`, `systemd-analyze security --offline`,
#                      its tokengate.toml ──▶ `tokengate check`
#   deploy/docker/Dockerfile ──▶ its build step is CI's (`cargo build --release --locked`),
#                      its context (.dockerignore) holds the package (`cargo metadata`)
#   every *.sh in the repository (and .ci/run) ──▶ shellcheck
#
# The Dockerfile is not built: these machines have no container engine.
# Installs what is missing itself: Debian's kubectl (with kustomize), prometheus (promtool),
# systemd (systemd-analyze), shellcheck; kubernetes-validate from PyPI into a venv under
# $TOKENGATE_CI_CACHE (default ~/.cache/tokengate-ci), reused while its pins are unchanged.
# Takes ~20 s once the tools are there (~10 s more for a fresh venv).
#
# Usage: .ci/e2e/deploy.sh          (after cargo build --release; root to install packages)
#   TOKENGATE_BIN  tokengate binary (default: <repo>/target/release/tokengate)
#   ALERTS_FILE    the operations script's rule file (default: .ci/e2e/prometheus-alerts.yml)
#   E2E_KEEP       =1: keep the work directory (builds, extracted configs) after the run
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)   # this file lives at <repo>/.ci/e2e/deploy.sh
TOKENGATE_BIN=${TOKENGATE_BIN:-$REPO_ROOT/target/release/tokengate}
ALERTS_FILE=${ALERTS_FILE:-$HERE/prometheus-alerts.yml}
KUBE=$REPO_ROOT/deploy/kubernetes
SYSTEMD=$REPO_ROOT/deploy/systemd
DOCKERFILE=$REPO_ROOT/deploy/docker/Dockerfile
CHECKS=$HERE/lib/deploy_checks.py
QUERIES=$HERE/lib/queries.py
ALERTS_TEST=$HERE/lib/prometheus-alerts-test.yml
REQUIREMENTS=$HERE/lib/deploy-requirements.txt
CACHE_DIR=${TOKENGATE_CI_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tokengate-ci}

# The Kubernetes schemas: native sidecars need >= 1.29 (beta, on by default); the newest the
# pinned kubernetes-validate carries; and for the pre-1.29 overlay the oldest it carries.
NATIVE_VERSIONS=(1.29.0 1.37.0)
PRE_129_VERSIONS=(1.25.0 1.29.0 1.37.0)
# A schema without native sidecars: the base must fail there, or the validation is not strict.
NO_SIDECAR_VERSION=1.27.0

APT_WAIT=600    # seconds for apt-get update + install
PIP_WAIT=300    # seconds for the venv and pip install
TOOL_WAIT=120   # seconds for any one check

PASSED=0
FAILED=0
POLICY_GUARD=""
say() { printf '[deploy-checks] %s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); say "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); say "FAIL: $*" >&2; }
die() { fail "$*"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tokengate-deploy-checks.XXXXXX")

cleanup() {
  local status=$?
  [[ -z $POLICY_GUARD ]] || rm -f "$POLICY_GUARD"
  if [[ ${E2E_KEEP:-0} == 1 ]]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  if [[ $status != 0 && $FAILED == 0 ]]; then FAILED=1; fi
  echo "deploy-checks: $PASSED passed, $FAILED failed"
  if [[ $FAILED != 0 ]]; then exit 1; fi
}
trap cleanup EXIT

# Runs lib/deploy_checks.py and counts its PASS:/FAIL: lines as checks of this script.
py_checks() {
  local out rc=0 failed_before=$FAILED line
  out=$(timeout "$TOOL_WAIT" "$VENV/bin/python" "$CHECKS" "$@" 2>&1) || rc=$?
  while IFS= read -r line; do
    case $line in
      "PASS: "*) pass "${line#PASS: }" ;;
      "FAIL: "*) fail "${line#FAIL: }" ;;
      "SKIP: "*) say "$line" ;;
      "") ;;
      *) say "  $line" ;;
    esac
  done <<<"$out"
  if [[ $rc != 0 && $FAILED == "$failed_before" ]]; then
    fail "deploy_checks.py $1 exited $rc"
  fi
}

[[ -x $TOKENGATE_BIN ]] ||
  die "no tokengate binary at $TOKENGATE_BIN (cargo build --release, or set TOKENGATE_BIN)"
for f in "$CHECKS" "$QUERIES" "$ALERTS_TEST" "$REQUIREMENTS" "$DOCKERFILE" \
  "$SYSTEMD/tokengate.service" "$SYSTEMD/tokengate.toml" "$KUBE/base/kustomization.yaml"; do
  [[ -f $f ]] || die "missing $f"
done

# ---- tools: Debian packages when missing, never started as services ----
declare -A PACKAGE_OF=([kubectl]=kubectl [promtool]=prometheus [systemd-analyze]=systemd
  [shellcheck]=shellcheck)
missing=()
for tool in kubectl promtool systemd-analyze shellcheck; do
  command -v "$tool" >/dev/null || missing+=("${PACKAGE_OF[$tool]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; installing Debian's packages needs root"
  say "installing Debian packages: ${missing[*]} (apt-get; services are not started)"
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    # invoke-rc.d asks this before starting a service; 101 means "not now".
    POLICY_GUARD=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_GUARD"
    chmod 755 "$POLICY_GUARD"
  fi
  if ! timeout "$APT_WAIT" bash -c 'apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"' \
      apt "${missing[@]}" >"$WORK/apt.log" 2>&1; then
    tail -n 20 "$WORK/apt.log" >&2
    die "apt-get install ${missing[*]} failed"
  fi
  if [[ -n $POLICY_GUARD ]]; then rm -f "$POLICY_GUARD"; POLICY_GUARD=""; fi
fi
for tool in kubectl promtool systemd-analyze shellcheck; do
  command -v "$tool" >/dev/null || die "$tool is still not on PATH"
done
pass "tools: $(kubectl version --client 2>/dev/null | head -n 1), $(promtool --version 2>&1 | head -n 1 | cut -d' ' -f1-3), $(systemd-analyze --version | head -n 1), shellcheck $(shellcheck --version | sed -n 's/^version: //p')"

# ---- kubernetes-validate, pinned, in a venv reused while the pins are the same ----
PINS_HASH=$(sha256sum "$REQUIREMENTS" | cut -c1-16)
VENV=$CACHE_DIR/deploy-venv-$PINS_HASH
if ! "$VENV/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  say "installing $(grep -m1 '^kubernetes-validate==' "$REQUIREMENTS") into $VENV"
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
pass "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version) in $VENV"

# ---- does the binary know fleet mode? ----
# Fleet mode's configuration ([fleet]) comes with the binary's fleet support. Until then the
# binary rejects the key, and the checks that need it say SKIP (never PASS): the fleet
# overlay's `tokengate check` and the fleet metrics' registration. Once the binary accepts
# [fleet], they run for real.
FLEET_PROBE=$WORK/fleet-probe
mkdir -p "$FLEET_PROBE"
printf 'probe-secret\n' >"$FLEET_PROBE/client_secret"
cat >"$FLEET_PROBE/tokengate.toml" <<EOF
[fleet]
redis_url = "redis://127.0.0.1:1"

[[integration]]
name = "probe"
listen = "127.0.0.1:8081"
token_url = "https://127.0.0.1:1/oauth/token"
client_id = "probe"
client_secret = { file = "$FLEET_PROBE/client_secret" }
EOF
timeout "$TOOL_WAIT" "$TOKENGATE_BIN" check --config "$FLEET_PROBE/tokengate.toml" >"$FLEET_PROBE/check.out" 2>&1 || true
if grep -q 'unknown key .fleet.' "$FLEET_PROBE/check.out"; then
  FLEET_SUPPORTED=0
  say "SKIP: this tokengate predates fleet mode ($(head -n 1 "$FLEET_PROBE/check.out")): the fleet overlay's tokengate check and the fleet metrics' registration are skipped"
else
  FLEET_SUPPORTED=1
fi

# ---- kustomize builds ----
BUILDS=(base overlays/example overlays/pre-1.29 overlays/fleet)
for b in "${BUILDS[@]}"; do
  out=$WORK/$(basename "$b").yaml
  if timeout "$TOOL_WAIT" kubectl kustomize "$KUBE/$b" >"$out" 2>"$WORK/kustomize.err"; then
    pass "kubectl kustomize deploy/kubernetes/$b ($(grep -c '^kind: ' "$out") resources)"
  else
    fail "kubectl kustomize deploy/kubernetes/$b: $(head -n 5 "$WORK/kustomize.err")"
    : >"$out"
  fi
done

# ---- schemas and custom resources ----
py_checks validate "$WORK/base.yaml" --label base "${NATIVE_VERSIONS[@]/#/--k8s=}"
py_checks validate "$WORK/example.yaml" --label example "${NATIVE_VERSIONS[@]/#/--k8s=}"
py_checks validate "$WORK/pre-1.29.yaml" --label pre-1.29 "${PRE_129_VERSIONS[@]/#/--k8s=}"
py_checks validate "$WORK/fleet.yaml" --label fleet "${NATIVE_VERSIONS[@]/#/--k8s=}"
# The negative control: the same strict validation must reject the base's native sidecar on
# a schema from before sidecars, or it would not have caught a misspelt field either.
if timeout "$TOOL_WAIT" "$VENV/bin/python" "$CHECKS" validate "$WORK/base.yaml" \
    --k8s="$NO_SIDECAR_VERSION" >"$WORK/negative.log" 2>&1; then
  fail "strict validation accepted the native sidecar against Kubernetes $NO_SIDECAR_VERSION"
elif grep -q "restartPolicy' was unexpected" "$WORK/negative.log"; then
  pass "strict validation is strict: Kubernetes $NO_SIDECAR_VERSION's schema rejects the base's restartPolicy on an init container"
else
  fail "the negative control failed for another reason: $(grep FAIL "$WORK/negative.log" | head -n 3)"
fi

# ---- native sidecar in base and example, ordinary sidecar before 1.29 ----
py_checks shape "$WORK/base.yaml" native --label base
py_checks shape "$WORK/example.yaml" native --label example
py_checks shape "$WORK/pre-1.29.yaml" ordinary --label pre-1.29
py_checks shape "$WORK/fleet.yaml" native --label fleet
py_checks fleet "$WORK/fleet.yaml" "$KUBE/base/tokengate.toml"

# The resource figures come from the benchmark and say so, in one place (the base).
DEPLOYMENT=$KUBE/base/deployment.yaml
cited=$(grep -cE '^ +(cpu|memory): [0-9]+[A-Za-z]* +# from bench/RESULTS\.md: ' "$DEPLOYMENT" || true)
if [[ $cited == 3 ]] && ! grep -rqE '^ +(cpu|memory): ' --include='*.yaml' "$KUBE/overlays"; then
  pass "resources: 3 figures in base/deployment.yaml, each citing bench/RESULTS.md, none in overlays"
else
  fail "resources: want 3 figures citing bench/RESULTS.md in base/deployment.yaml and none in overlays (found $cited)"
fi
if [[ -f $REPO_ROOT/bench/RESULTS.md ]] && grep -q 'bench/RESULTS.md: <fill>' "$DEPLOYMENT"; then
  fail "resources: bench/RESULTS.md exists but base/deployment.yaml still says <fill>"
fi

# ---- the ConfigMap's tokengate.toml passes `tokengate check` ----
tokengate_check() {  # label dir   (dir/env: NAME=VALUE lines for its environment, if any)
  local label=$1 dir=$2 rc=0 value leaked=0 envs=()
  if [[ -f $dir/env ]]; then mapfile -t envs <"$dir/env"; fi
  timeout "$TOOL_WAIT" env -- "${envs[@]}" "$TOKENGATE_BIN" check --config "$dir/tokengate.toml" >"$dir/check.out" 2>&1 || rc=$?
  if [[ $rc == 0 ]]; then
    pass "$label: tokengate check accepts the config and reads every secret file"
  else
    fail "$label: tokengate check exited $rc: $(head -n 5 "$dir/check.out")"
  fi
  if grep -qi 'warn' "$dir/check.out"; then
    fail "$label: tokengate check warns: $(grep -i 'warn' "$dir/check.out" | head -n 3)"
  else
    pass "$label: tokengate check has no warning"
  fi
  while IFS= read -r value; do
    [[ -n $value ]] || continue
    if grep -qF -- "$value" "$dir/check.out"; then leaked=1; fi
  done <"$dir/placeholders"
  if [[ $leaked == 0 ]]; then
    pass "$label: tokengate check printed no secret"
  else
    fail "$label: tokengate check printed a placeholder secret"
  fi
}
for b in base example pre-1.29 fleet; do
  mkdir -p "$WORK/config-$b"
  py_checks config "$WORK/$b.yaml" "$WORK/config-$b" --label "$b"
  if [[ $b == fleet && $FLEET_SUPPORTED == 0 ]]; then
    say "SKIP: fleet: tokengate check (this tokengate predates fleet mode and rejects [fleet])"
  elif [[ -s $WORK/config-$b/tokengate.toml ]]; then
    tokengate_check "$b" "$WORK/config-$b"
  else
    fail "$b: no tokengate.toml extracted"
  fi
done

# The negative control: without one of the secret files the same check must fail (exit 2),
# or it was not reading them.
if [[ -s $WORK/config-example/tokengate.toml ]]; then
  rm -f "$WORK/config-example/var/run/secrets/tokengate/oms/client_secret"
  rc=0
  timeout "$TOOL_WAIT" "$TOKENGATE_BIN" check --config "$WORK/config-example/tokengate.toml" >"$WORK/check-missing.out" 2>&1 || rc=$?
  if [[ $rc == 2 ]] && grep -q 'client_secret' "$WORK/check-missing.out"; then
    pass "tokengate check exits 2 naming client_secret when a mounted secret file is missing"
  else
    fail "tokengate check with a missing secret file exited $rc: $(head -n 3 "$WORK/check-missing.out")"
  fi
fi

# ---- alerts: promtool, one set of rules, metric names; dashboard queries parse ----
py_checks rules "$WORK/base.yaml" "$WORK/rules.yml" --same-as "$ALERTS_FILE" --label base
if timeout "$TOOL_WAIT" promtool check rules "$WORK/rules.yml" >"$WORK/promtool.log" 2>&1; then
  pass "promtool check rules: the PrometheusRule's groups ($(sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p' "$WORK/promtool.log") rules)"
else
  fail "promtool check rules rejects the PrometheusRule's groups: $(tail -n 5 "$WORK/promtool.log")"
fi
# The fleet alerts' arithmetic on made-up fleet histories (a healthy fleet, one that does not
# share, a rolling restart, Redis down): they fire when they should and only then.
if timeout "$TOOL_WAIT" promtool test rules "$ALERTS_TEST" >"$WORK/promtool-test.log" 2>&1; then
  pass "promtool test rules: the fleet alerts on $(grep -c '^  - interval:' "$ALERTS_TEST") made-up histories (lib/prometheus-alerts-test.yml)"
else
  fail "promtool test rules $ALERTS_TEST: $(grep -v '^$' "$WORK/promtool-test.log" | head -n 15)"
fi
if [[ $FLEET_SUPPORTED == 1 ]]; then
  py_checks metrics "$WORK/base.yaml" "$REPO_ROOT/src/telemetry.rs"
else
  py_checks metrics "$WORK/base.yaml" "$REPO_ROOT/src/telemetry.rs" --skip-missing tokengate_fleet_
fi

# lib/queries.py is what the operations script evaluates against a real Prometheus; here every
# line it prints must be PromQL that promtool parses (as a recording rule).
DASHBOARD=$KUBE/base/grafana-dashboard.json
if "$VENV/bin/python" "$QUERIES" "$DASHBOARD" "$KUBE/base/prometheusrule.yaml" >"$WORK/queries.txt" 2>"$WORK/queries.err"; then
  pass "lib/queries.py extracts $(wc -l <"$WORK/queries.txt") queries from the dashboard and the alerts"
  "$VENV/bin/python" - "$WORK/queries.txt" "$WORK/queries-rules.yml" <<'EOF'
import sys, yaml
exprs = [l.rstrip("\n") for l in open(sys.argv[1]) if l.strip()]
rules = [{"record": "tokengate:query_%d" % i, "expr": e} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}, open(sys.argv[2], "w"))
EOF
  if timeout "$TOOL_WAIT" promtool check rules "$WORK/queries-rules.yml" >"$WORK/promtool-queries.log" 2>&1; then
    pass "promtool parses every dashboard query and every alert expression without its threshold"
  else
    fail "promtool rejects a query: $(grep -v '^$' "$WORK/promtool-queries.log" | tail -n 5)"
  fi
else
  fail "lib/queries.py: $(cat "$WORK/queries.err")"
fi

# ---- systemd ----
# verify needs ExecStart= to exist: point it at the binary under test. It reports unknown keys
# and bad values as warnings with exit 0, so any output fails the check.
mkdir -p "$WORK/systemd"
sed "s#^ExecStart=/usr/local/bin/tokengate #ExecStart=$TOKENGATE_BIN #" \
  "$SYSTEMD/tokengate.service" >"$WORK/systemd/tokengate.service"
if grep -q "^ExecStart=$TOKENGATE_BIN " "$WORK/systemd/tokengate.service"; then
  rc=0
  timeout "$TOOL_WAIT" systemd-analyze verify "$WORK/systemd/tokengate.service" >"$WORK/verify.log" 2>&1 || rc=$?
  if [[ $rc == 0 && ! -s $WORK/verify.log ]]; then
    pass "systemd-analyze verify tokengate.service: no errors, no warnings"
  else
    fail "systemd-analyze verify (exit $rc): $(head -n 10 "$WORK/verify.log")"
  fi
else
  fail "tokengate.service has no ExecStart=/usr/local/bin/tokengate ... line"
fi
# Exposure score 0-10 (shown as 0.0-10.0); --threshold is in tenths. The unit scores 1.2.
rc=0
timeout "$TOOL_WAIT" systemd-analyze security --offline=true --threshold=20 \
  "$WORK/systemd/tokengate.service" >"$WORK/security.log" 2>&1 || rc=$?
score=$(sed -n 's/.*Overall exposure level for tokengate.service: \([0-9.]*\).*/\1/p' "$WORK/security.log")
if [[ $rc == 0 && -n $score ]]; then
  pass "systemd-analyze security --offline: exposure $score (<= 2.0)"
else
  fail "systemd-analyze security --offline: exposure ${score:-unknown} (exit $rc): $(grep '✗' "$WORK/security.log" | head -n 10)"
fi
# shellcheck disable=SC2016 # $MAINPID is systemd's, written literally in the unit
for key in 'ExecReload=/bin/kill -HUP $MAINPID' 'Restart=on-failure' 'DynamicUser=yes' \
  'ProtectSystem=strict' 'NoNewPrivileges=yes' 'CapabilityBoundingSet=' 'UMask=0077'; do
  if grep -qxF -- "$key" "$SYSTEMD/tokengate.service"; then :; else fail "tokengate.service lacks '$key'"; fi
done
grace=$(sed -n 's/^shutdown_grace *= *"\([0-9]*\)s".*/\1/p' "$SYSTEMD/tokengate.toml")
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s*$/\1/p' "$SYSTEMD/tokengate.service")
if [[ -n $grace && -n $stop ]] && ((stop > grace)); then
  pass "tokengate.service: ExecReload SIGHUP, Restart=on-failure, DynamicUser, hardening; TimeoutStopSec=${stop}s > shutdown_grace ${grace}s"
else
  fail "TimeoutStopSec (${stop:-unset}) must exceed tokengate.toml's shutdown_grace (${grace:-unset})"
fi
mkdir -p "$WORK/config-systemd"
py_checks systemd-config "$SYSTEMD/tokengate.toml" "$WORK/config-systemd"
tokengate_check systemd "$WORK/config-systemd"

# ---- Dockerfile: CI's build command, a context that holds the package ----
if grep -qE '^[[:space:]]*cargo build --release --locked([[:space:]]|$)' "$DOCKERFILE" &&
    grep -qE '^cargo build --release --locked$' "$REPO_ROOT/.ci/run"; then
  pass "Dockerfile builds with CI's command: cargo build --release --locked"
else
  fail "the Dockerfile's build step is not .ci/run's 'cargo build --release --locked'"
fi
rust_ci=$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9]*\.[0-9]*\).*/\1/p')
rust_docker=$(sed -n 's/^ARG RUST_VERSION=\([0-9.]*\)$/\1/p' "$DOCKERFILE")
if [[ -n $rust_ci && $rust_ci == "$rust_docker" ]]; then
  pass "Dockerfile's Rust $rust_docker is CI's toolchain"
else
  fail "Dockerfile's ARG RUST_VERSION=${rust_docker:-unset} is not CI's rustc ${rust_ci:-unknown}"
fi
if grep -qx 'FROM gcr.io/distroless/cc-debian12:nonroot' "$DOCKERFILE" &&
    grep -qx 'USER 65532:65532' "$DOCKERFILE" &&
    grep -qx 'ENTRYPOINT \["/usr/local/bin/tokengate"\]' "$DOCKERFILE" &&
    grep -qx 'ENV TOKENGATE_CONFIG=/etc/tokengate/tokengate.toml' "$DOCKERFILE" &&
    grep -qx 'EXPOSE 9464' "$DOCKERFILE"; then
  pass "Dockerfile: distroless cc-debian12:nonroot, USER 65532, exec-form ENTRYPOINT, TOKENGATE_CONFIG, EXPOSE 9464"
else
  fail "Dockerfile lacks the runtime stage's FROM/USER/ENTRYPOINT/ENV/EXPOSE lines"
fi
# The build context as .dockerignore leaves it (an allowlist: '*' then '!path' lines), and
# every COPY source in it; cargo metadata fails if a target's source is missing.
CONTEXT=$WORK/docker-context
mkdir -p "$CONTEXT"
context_ok=1
if [[ $(grep -vE '^[[:space:]]*(#|$)' "$REPO_ROOT/.dockerignore" | head -n 1) != '*' ]]; then
  fail ".dockerignore does not start with '*' (an allowlist)"
  context_ok=0
fi
while IFS= read -r keep; do
  keep=${keep#!}
  keep=${keep%/}
  if [[ -e $REPO_ROOT/$keep ]]; then
    cp -a "$REPO_ROOT/$keep" "$CONTEXT/"
  else
    fail ".dockerignore keeps $keep, which does not exist"
    context_ok=0
  fi
done < <(grep -E '^!' "$REPO_ROOT/.dockerignore")
while read -r src; do
  [[ -e $CONTEXT/$src ]] || { fail "Dockerfile copies $src, which the build context does not hold"; context_ok=0; }
done < <(awk '/^COPY / && !/--from=/ { for (i = 2; i < NF; i++) print $i }' "$DOCKERFILE")
if [[ $context_ok == 1 ]] &&
    timeout "$TOOL_WAIT" cargo metadata --locked --offline --no-deps --format-version 1 \
      --manifest-path "$CONTEXT/Cargo.toml" >/dev/null 2>"$WORK/metadata.err"; then
  pass "the Docker build context (.dockerignore) holds the whole package: cargo metadata --locked"
else
  fail "the Docker build context is incomplete: $(head -n 5 "$WORK/metadata.err" 2>/dev/null)"
fi

# ---- shellcheck on every shell script ----
mapfile -t SCRIPTS < <(cd "$REPO_ROOT" && find . \( -name .git -o -name target -o -name node_modules \) -prune \
  -o -type f -name '*.sh' -print | sort)
[[ -f $REPO_ROOT/.ci/run ]] && SCRIPTS+=(./.ci/run)
if ((${#SCRIPTS[@]} == 0)); then
  fail "found no shell script to check"
fi
for s in "${SCRIPTS[@]}"; do
  if (cd "$REPO_ROOT" && timeout "$TOOL_WAIT" shellcheck -x "$s") >"$WORK/shellcheck.log" 2>&1; then
    pass "shellcheck ${s#./}"
  else
    fail "shellcheck ${s#./}: $(head -n 15 "$WORK/shellcheck.log")"
  fi
done
