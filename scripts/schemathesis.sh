#!/usr/bin/env bash
# scripts/schemathesis.sh — Schemathesis against a live gateway, checked
# against the OpenAPI document it serves (docs/openapi.json).
#
#   1. Redis and PostgreSQL up (scripts/deps.sh), curl, jq and psql present;
#      Schemathesis $ST_VERSION installed in a virtualenv under target/ when
#      missing (python3-venv from apt-get when Python cannot make one)
#   2. cargo build --release; `seckill serve` on a free loopback port with its
#      own Redis key prefix and database, rate limits off (so no answer
#      depends on how fast the cases come)
#   3. a demo promotion (1000 units, on sale now for an hour), one with a
#      captcha, one that starts tomorrow, and a buyer's JWT from
#      `seckill token --user 42`
#   4. two Schemathesis runs on the document the gateway serves at
#      /openapi.json: the /admin operations with the admin token, every other
#      operation with the buyer's JWT; positive and negative cases
#      (--mode all), phases examples, coverage, fuzzing and stateful (the
#      document's links: create → edit/delete, buy → pay/cancel, register →
#      login), at most $ST_MAX_EXAMPLES cases per operation and phase, a
#      fixed seed; every check but positive_data_acceptance (see below):
#      no 5xx, status codes, content types, response schemas and headers
#      as documented, negative data rejected, unsupported methods 405 with
#      Allow, auth enforced, a deleted promotion gone
#   5. the summary: operations, cases and findings of each run
#
# Exit status 0 only when both runs found nothing. Reports (JUnit, NDJSON)
# and the gateway's log stay in the printed directory after a failure.
#
# Environment (defaults in brackets):
#   ST_MAX_EXAMPLES [25]   cases per operation and phase
#   ST_SEED         [13]   Schemathesis's random seed
#   ST_WORKERS      [1]    concurrent Schemathesis workers (1: the same cases each run)
#   ST_CHECKS       [all], ST_EXCLUDE_CHECKS [positive_data_acceptance]
#   ST_VENV         [target/schemathesis-venv]
#   plus what loadtest/lib.sh reads (SECKILL_REDIS_URL, LT_PG_SERVER, LT_KEEP).

set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

ST_VERSION=4.32.5
ST_MAX_EXAMPLES=${ST_MAX_EXAMPLES:-25}
ST_SEED=${ST_SEED:-13}
ST_WORKERS=${ST_WORKERS:-1}
ST_VENV=${ST_VENV:-${CARGO_TARGET_DIR:-target}/schemathesis-venv}
case $ST_VENV in /*) ;; *) ST_VENV=$LT_ROOT/$ST_VENV ;; esac

lt_exit_traps
lt_setup_path
lt_deps
lt_ensure_tools curl jq psql redis-cli

# Schemathesis, pinned, in a virtualenv of its own: Debian's Python refuses
# global pip installs, and the pin keeps what "no finding" means stable.
st_ensure() {
	local st=$ST_VENV/bin/schemathesis
	if [[ -x $st ]] && "$st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
		return 0
	fi
	command -v python3 >/dev/null 2>&1 || lt_apt_install python3
	rm -rf "$ST_VENV"
	if ! python3 -m venv "$ST_VENV" >>"$LT_DIR/pip.log" 2>&1; then
		lt_apt_install python3-venv
		rm -rf "$ST_VENV"
		python3 -m venv "$ST_VENV" >>"$LT_DIR/pip.log" 2>&1 ||
			lt_die "python3 -m venv failed (log: $LT_DIR/pip.log)"
	fi
	lt_log "installing schemathesis $ST_VERSION with pip into $ST_VENV (log: $LT_DIR/pip.log)"
	"$ST_VENV/bin/pip" install --quiet --disable-pip-version-check \
		"schemathesis==$ST_VERSION" >>"$LT_DIR/pip.log" 2>&1 || {
		tail -n 20 "$LT_DIR/pip.log" >&2
		lt_die "pip install schemathesis==$ST_VERSION failed"
	}
	"$st" --version >/dev/null 2>&1 || lt_die "schemathesis was installed but does not run"
}
st_ensure

lt_build
# Rate limits off (lib.sh's default) and no login-failure budget: the
# answers must not depend on how many cases came before.
export SECKILL_RATE_LOGIN_FAILURES=${SECKILL_RATE_LOGIN_FAILURES:-0}
lt_start_gateway gw serve

# In the scratch database these are promotions 1, 2 and 3: the document's
# examples name 1 (on sale) and, on the captcha and token routes, 2.
demo=$(lt_create_promotion "schemathesis demo sale" 1000)
[[ $demo == 1 ]] || lt_log "warning: the demo promotion is $demo, not 1: the examples miss it"
starts=$(date -u -d '-1 min' +%Y-%m-%dT%H:%M:%SZ)
ends=$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)
lt_admin POST /admin/promotions "$(jq -nc --arg s "$starts" --arg e "$ends" \
	'{name: "schemathesis captcha sale", stock: 100, starts_at: $s, ends_at: $e,
	  require_captcha: true}')" >/dev/null
lt_admin POST /admin/promotions "$(jq -nc \
	--arg s "$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)" \
	--arg e "$(date -u -d '+1 day +1 hour' +%Y-%m-%dT%H:%M:%SZ)" \
	'{name: "schemathesis upcoming sale", stock: 100, starts_at: $s, ends_at: $e}')" >/dev/null
jwt=$(lt_env "$LT_BIN" token --user 42)
lt_log "promotions $demo and two more on $LT_URL; buyer 42's JWT minted"

# The document the gateway serves must be the file in docs/.
curl -fsS "$LT_URL/openapi.json" -o "$LT_DIR/openapi.json"
cmp -s "$LT_DIR/openapi.json" docs/openapi.json ||
	lt_die "GET /openapi.json differs from docs/openapi.json"

# Every check but positive_data_acceptance, which wants every schema-valid
# request accepted: some refusals depend on the state, not the body (a
# captcha asked of a promotion without one is 400), and a gateway without
# bucket support refuses `buckets` as an unknown field.
checks=${ST_CHECKS:-all}
exclude_checks=${ST_EXCLUDE_CHECKS:-positive_data_acceptance}

# st_run NAME AUTH FILTER...: one Schemathesis run; its output in $LT_DIR/NAME.txt.
st_run() {
	local name=$1 auth=$2 rc=0
	shift 2
	lt_log "schemathesis: $name operations"
	# The copy the gateway served (Schemathesis leaves out the operation
	# that serves the document it loaded from a URL; from a file it tests
	# that one too). It runs in $LT_DIR, where it keeps its cache
	# (.schemathesis/), not in the repository.
	(cd "$LT_DIR" && exec "$ST_VENV/bin/schemathesis" run "$LT_DIR/openapi.json" \
		--url "$LT_URL" \
		-H "Authorization: Bearer $auth" \
		--checks "$checks" \
		${exclude_checks:+--exclude-checks "$exclude_checks"} \
		--mode all \
		--phases examples,coverage,fuzzing,stateful \
		--max-examples "$ST_MAX_EXAMPLES" \
		--seed "$ST_SEED" \
		--workers "$ST_WORKERS" \
		--request-timeout 10 \
		--suppress-health-check all \
		--no-color \
		--report junit,ndjson --report-dir "$LT_DIR/$name-report" \
		"$@") >"$LT_DIR/$name.txt" 2>&1 || rc=$?
	return "$rc"
}

admin_rc=0
st_run admin "$LT_ADMIN_TOKEN" --include-path-regex '^/admin/' || admin_rc=$?
user_rc=0
st_run user "$jwt" --exclude-path-regex '^/admin/' || user_rc=$?

# The summary of each run, in Schemathesis's own words (operations, phases,
# failures, warnings, test cases), without the report paths.
summary() {
	sed -n '/^=* SUMMARY =*$/,$p' "$LT_DIR/$1.txt" |
		sed -e '/^Reports:/,/^$/d' -e '/^=* SUMMARY =*$/d' -e '/^[[:space:]]*$/d' || true
}
echo
echo "================ Schemathesis $ST_VERSION against seckill ================"
for run in admin user; do
	rc_var=${run}_rc
	echo "--- $run operations (exit ${!rc_var}) ---"
	summary "$run"
done
echo "=========================================================================="
if ((admin_rc != 0 || user_rc != 0)); then
	for run in admin user; do
		rc_var=${run}_rc
		((${!rc_var} == 0)) && continue
		echo "--- $run: full output ($LT_DIR/$run.txt) ---"
		cat "$LT_DIR/$run.txt"
	done
	echo "RESULT: FAIL"
	exit 1
fi
echo "RESULT: PASS"
