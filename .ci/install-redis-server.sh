#!/usr/bin/env bash
# Makes Debian's `redis-server` available for the fleet-mode tests: `cargo test` and
# .ci/e2e/prometheus.sh start their own `redis-server --port <free> --bind 127.0.0.1 --save ''`
# and stop it by PID. Nothing is done when redis-server is already on PATH. Otherwise the
# package is installed with apt-get (as root, or through `sudo -n`), and never started as a
# service: Debian's package would start one on port 6379 at install time, so a policy-rc.d
# that answers "not now" stands in front of invoke-rc.d while apt-get runs (unless the machine
# already has one).
#
# Usage: .ci/install-redis-server.sh   (called by .ci/run before `cargo test`)
set -euo pipefail

APT_WAIT=600   # seconds for apt-get update + install

say() { printf '[redis-server] %s\n' "$*"; }
die() { printf '[redis-server] FAIL: %s\n' "$*" >&2; exit 1; }

if ! command -v redis-server >/dev/null; then
  SUDO=()
  if [[ $(id -u) != 0 ]]; then
    sudo -n true 2>/dev/null ||
      die "redis-server is not on PATH; installing Debian's package needs root or passwordless sudo (apt-get install redis-server)"
    SUDO=(sudo -n)
  fi
  say "installing Debian's redis-server package (apt-get; it is not started as a service)"
  log=$(mktemp "${TMPDIR:-/tmp}/tokengate-redis-apt.XXXXXX")
  # shellcheck disable=SC2016 # the inner shell expands its own variables
  if ! timeout "$APT_WAIT" "${SUDO[@]}" bash -c '
      set -e
      guard=""
      if [ ! -e /usr/sbin/policy-rc.d ]; then
        # invoke-rc.d asks this before starting a service; 101 means "not now".
        guard=/usr/sbin/policy-rc.d
        trap "rm -f $guard" EXIT
        printf "#!/bin/sh\nexit 101\n" >"$guard"
        chmod 755 "$guard"
      fi
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server' \
      >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    die "apt-get install redis-server failed"
  fi
  rm -f "$log"
fi
command -v redis-server >/dev/null || die "redis-server is still not on PATH"
say "$(redis-server --version | cut -d' ' -f1-3) at $(command -v redis-server)"
