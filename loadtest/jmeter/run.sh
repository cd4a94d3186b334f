#!/usr/bin/env bash
# loadtest/jmeter/run.sh — the flash sale with JMeter instead of k6, end to end:
# deps, build, a gateway on a free loopback port (own key prefix and
# database), a promotion, tokens.csv from `seckill tokens`, then
#
#   jmeter -n -t loadtest/jmeter/flash_sale.jmx -Jhost=127.0.0.1 -Jport=PORT \
#     -Jpromotion=ID -Jusers=N -Jtokens=tokens.csv -l results.jtl
#
# and the checks: 200s == STOCK, no response outside 200/409/410, every sold
# order persisted, reconcile clean. Installs JMeter (Debian package, 2.13)
# when missing. Exit 0 when every check passes.
#
# Environment: STOCK [1000], USERS [5000] buyers (one JMeter thread each),
#   RAMPUP [5] s over which they arrive, plus what loadtest/lib.sh reads
#   (SECKILL_*, LT_PG_SERVER).
#   LOGIN [0]: 1 turns on the plan's login step (-Jlogin=1): each buyer
#   registers an account and logs in for the JWT it buys with, instead of
#   using the CSV's. Off by default so the purchase-only figures stay
#   comparable. Two Argon2id hashes per buyer: with LOGIN=1 the defaults
#   become STOCK [50], USERS [100], RAMPUP [20] (5 buyers a second), and the
#   gateway's failed-login budget is off (SECKILL_RATE_LOGIN_FAILURES [0]:
#   every buyer comes from this one address, and a login reserves a failure
#   until its password is checked). Every register must be 201 and every
#   login 200.
#   --keep keeps the scratch state and results.

set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

keep=0
[[ ${1:-} == --keep ]] && keep=1
LOGIN=${LOGIN:-0}
if [[ $LOGIN == 1 ]]; then
	STOCK=${STOCK:-50}
	USERS=${USERS:-100}
	RAMPUP=${RAMPUP:-20}
	export SECKILL_RATE_LOGIN_FAILURES=${SECKILL_RATE_LOGIN_FAILURES:-0}
else
	STOCK=${STOCK:-1000}
	USERS=${USERS:-5000}
	RAMPUP=${RAMPUP:-5}
fi

LT_KEEP=$keep
lt_exit_traps

lt_setup_path
lt_deps
lt_ensure_tools curl jq psql redis-cli
# Debian splits JMeter: the HTTP sampler is in jmeter-http.
if ! command -v jmeter >/dev/null 2>&1 ||
	{ [[ -d /usr/share/jmeter ]] && ! ls /usr/share/jmeter/lib/ext/ApacheJMeter_http*.jar >/dev/null 2>&1; }; then
	lt_apt_install jmeter jmeter-http
fi
command -v jmeter >/dev/null 2>&1 || lt_die "jmeter is missing"

# Debian 12 pairs JMeter 2.13 with XStream 1.4.20, whose allow-list refuses
# every JMeter class ("ForbiddenClassException: ...ScriptWrapper"): put the
# permissive stand-in from xstream-allow-all/ ahead of xstream.jar (see the
# comment in its source). Debian's java-wrappers prepend JAVA_CLASSPATH.
if [[ -f /usr/share/java/xstream.jar ]] && jmeter --version 2>/dev/null | grep -q 'Version 2\.'; then
	command -v javac >/dev/null 2>&1 || lt_apt_install default-jdk-headless
	shim=$LT_DIR/xstream-allow-all
	mkdir -p "$shim"
	javac -nowarn -source 8 -target 8 -cp /usr/share/java/xstream.jar -d "$shim" \
		loadtest/jmeter/xstream-allow-all/com/thoughtworks/xstream/security/NoTypePermission.java \
		2>"$LT_DIR/javac.log" || {
		cat "$LT_DIR/javac.log" >&2
		lt_die "cannot compile the XStream stand-in"
	}
	export JAVA_CLASSPATH=$shim${JAVA_CLASSPATH:+:$JAVA_CLASSPATH}
fi
lt_build

lt_start_gateway gw serve
promo=$(lt_create_promotion "jmeter flash sale" "$STOCK")
port=${LT_URL##*:}
lt_env "$LT_BIN" tokens --users "$USERS" --header >"$LT_DIR/tokens.csv"
lt_log "promotion $promo: $STOCK units; $USERS buyers arriving over ${RAMPUP}s"

jmeter_rc=0
started=$(date +%s.%N)
# JVM_ARGS: a small heap is plenty; -Djava.awt.headless for machines without X.
JVM_ARGS="${JVM_ARGS:--Xms256m -Xmx512m -Djava.awt.headless=true}" \
	jmeter -n -t loadtest/jmeter/flash_sale.jmx -j "$LT_DIR/jmeter.log" \
	-Jhost=127.0.0.1 -Jport="$port" -Jpromotion="$promo" -Jusers="$USERS" \
	-Jtokens="$LT_DIR/tokens.csv" -Jrampup="$RAMPUP" -Jlogin="$LOGIN" -Jrun="$LT_RUN_ID" \
	-Jjmeter.save.saveservice.print_field_names=true \
	-l "$LT_DIR/results.jtl" | tee "$LT_DIR/jmeter.txt" || jmeter_rc=$?
elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

drain_rc=0
drain_s=$(lt_wait_drained "$promo" 120) || drain_rc=1
stats=$(lt_stats "$promo")
reconcile_rc=0
lt_env "$LT_BIN" reconcile --promotion "$promo" >"$LT_DIR/reconcile.txt" 2>&1 || reconcile_rc=$?
pg_rows=$(lt_psql -c "SELECT count(*) FROM orders WHERE promotion_id = $promo")
dup_users=$(lt_psql -c "SELECT count(*) - count(DISTINCT user_id) FROM orders WHERE promotion_id = $promo")

[[ -s $LT_DIR/results.jtl ]] || {
	tail -n 30 "$LT_DIR/jmeter.log" >&2
	lt_die "JMeter wrote no results (log: $LT_DIR/jmeter.log)"
}
# results.jtl is CSV: timeStamp,elapsed,label,responseCode,responseMessage,threadName,dataType,success,...
# The purchase figures count the purchase samples only; failed counts every
# sample (register and login too, with LOGIN=1).
samples=$(awk -F, 'NR > 1 && $3 == "purchase"' "$LT_DIR/results.jtl" | wc -l)
codes=$(awk -F, 'NR > 1 && $3 == "purchase" { n[$4]++ } END { for (c in n) printf "%s: %d  ", c, n[c] }' "$LT_DIR/results.jtl")
ok=$(awk -F, 'NR > 1 && $3 == "purchase" && $4 == "200"' "$LT_DIR/results.jtl" | wc -l)
failed=$(awk -F, 'NR > 1 && $8 != "true"' "$LT_DIR/results.jtl" | wc -l)
p99=$(awk -F, 'NR > 1 && $3 == "purchase" { print $2 }' "$LT_DIR/results.jtl" | sort -n |
	awk '{ v[NR] = $1 } END { i = int(NR * 0.99); if (i < 1) i = 1; print v[i] }')
p50=$(awk -F, 'NR > 1 && $3 == "purchase" { print $2 }' "$LT_DIR/results.jtl" | sort -n |
	awk '{ v[NR] = $1 } END { i = int(NR * 0.5); if (i < 1) i = 1; print v[i] }')
registered=$(awk -F, 'NR > 1 && $3 == "register" && $4 == "201"' "$LT_DIR/results.jtl" | wc -l)
logged_in=$(awk -F, 'NR > 1 && $3 == "login" && $4 == "200"' "$LT_DIR/results.jtl" | wc -l)
login_p50=$(awk -F, 'NR > 1 && $3 == "login" { print $2 }' "$LT_DIR/results.jtl" | sort -n |
	awk '{ v[NR] = $1 } END { i = int(NR * 0.5); if (i < 1) i = 1; print v[i] + 0 }')

echo
echo "================ seckill JMeter flash sale ================"
printf '%-22s %s\n' "jmeter" "$(jmeter --version 2>/dev/null | grep -m1 -o 'Version [^ ]*'), exit $jmeter_rc, ${elapsed}s"
printf '%-22s %s\n' "samples" "$samples purchases ($USERS buyers): $codes"
printf '%-22s %s\n' "latency" "p50 ${p50} ms  p99 ${p99} ms (JMeter elapsed, whole ms)"
if [[ $LOGIN == 1 ]]; then
	printf '%-22s %s\n' "login step" "$registered registered (201), $logged_in logged in (200) of $USERS buyers; login p50 ${login_p50} ms"
fi
printf '%-22s %s\n' "failed samples" "$failed (must be 0: only 200/409/410 pass the purchase assertion, 201 register, 200 login)"
printf '%-22s %s\n' "bought" "$ok 200s, stock $STOCK, PostgreSQL $pg_rows, buyers with two orders $dup_users"
printf '%-22s %s\n' "stats" "$(jq -c .stats <<<"$stats"); drained ${drain_s}s after JMeter ended"
printf '%-22s %s\n' "reconcile" "$(tail -n1 "$LT_DIR/reconcile.txt") (exit $reconcile_rc)"
echo "==========================================================="
if ((jmeter_rc != 0 || samples != USERS || failed != 0 || ok != STOCK || pg_rows != STOCK ||
	dup_users != 0 || drain_rc != 0 || reconcile_rc != 0)) ||
	{ [[ $LOGIN == 1 ]] && ((registered != USERS || logged_in != USERS)); }; then
	echo "RESULT: FAIL"
	exit 1
fi
echo "RESULT: PASS"
