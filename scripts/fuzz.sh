#!/usr/bin/env bash
# A short fuzz run of the proxy's request-head handling and host routing (fuzz/): builds the
# targets and runs each for FUZZ_SECONDS (default 30) from the committed corpus. A crash fails
# the run; libFuzzer leaves the input in fuzz/artifacts/<target>/.
#
# No sanitizer by default: the code under test is safe Rust, what the targets look for are
# panics and broken invariants, and an AddressSanitizer build takes minutes longer and runs
# several times slower. FUZZ_SANITIZER=address turns it on.
#
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept
# them, for these commands only.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-none}"
cargo_fuzz_version=0.13.2
targets=(route_key request_head)

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $cargo_fuzz_version" ]; then
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi
# libfuzzer-sys compiles libFuzzer, which is C++.
if ! command -v c++ >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++ >/dev/null
  else
    echo "fuzz: a C++ compiler is missing (apt-get install g++)" >&2
    exit 1
  fi
fi

RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer "$sanitizer"
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
failed=()
for t in "${targets[@]}"; do
  # New inputs go to a scratch directory (the first one named); the committed corpus is
  # only read.
  mkdir -p "$new/$t"
  echo "fuzz: $t for ${seconds}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer "$sanitizer" "$t" "$new/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 ||
    failed+=("$t")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
