#!/usr/bin/env bash
# A bounded cargo-fuzz run of every target, for CI and by hand (see README.md).
#
# Usage: fuzz/run.sh
#   FUZZ_SECONDS   seconds per target (default 60; CI uses 30)
#   FUZZ_TARGETS   targets to run (default: all, from fuzz/Cargo.toml)
#
# cargo fuzz needs a nightly toolchain. Without one this prints why and exits 0: the seeds in
# fuzz/seeds/ still run through the same checks in tests/properties.rs on stable, so nothing
# goes unchecked, it is only not fuzzed. cargo-fuzz itself is installed from crates.io when
# missing. A crash fails the run; libFuzzer saves the input under fuzz/artifacts/<target>/
# (reproduce with `cargo +nightly fuzz run <target> <file>`).
# The last line is `fuzz: N passed, M failed` (targets).
set -euo pipefail

cd "$(dirname "$0")"
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TARGETS=${FUZZ_TARGETS:-"token_response request_target"}
[[ $FUZZ_SECONDS =~ ^[0-9]+$ ]] || { echo "fuzz: FUZZ_SECONDS must be a whole number" >&2; exit 2; }

say() { printf '[fuzz] %s\n' "$*"; }
skip() { say "skipped: $*"; echo "fuzz: 0 passed, 0 failed (skipped)"; exit 0; }

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  skip "no nightly toolchain (cargo fuzz needs -Zsanitizer and libFuzzer's instrumentation); the seeds still run on stable in tests/properties.rs"
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked --quiet || skip "cargo-fuzz could not be installed"
fi

PASSED=0; FAILED=()
for target in $FUZZ_TARGETS; do
  # The seeds are committed and read-only; what libFuzzer finds goes into corpus/ (ignored).
  mkdir -p "corpus/$target"
  say "$target for ${FUZZ_SECONDS}s"
  # No sanitizer: the crate forbids unsafe code, so AddressSanitizer would find nothing the
  # checks cannot, and building without it is much faster.
  if cargo +nightly fuzz run --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 >"corpus/$target.log" 2>&1; then
    PASSED=$((PASSED + 1))
    say "ok    $target: $(grep -E '^Done [0-9]+ runs' "corpus/$target.log" || echo 'done')"
  else
    FAILED+=("$target")
    say "FAIL  $target"
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "corpus/$target.log" >&2 || tail -n 30 "corpus/$target.log" >&2
  fi
done

echo "fuzz: $PASSED passed, ${#FAILED[@]} failed"
((${#FAILED[@]} == 0))
