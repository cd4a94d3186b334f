#!/usr/bin/env bash
# loadtest/run.sh — one command: the stack on loopback, a flash sale driven by
# k6, and the checks that the sale was right.
#
#   loadtest/run.sh            5,000 buyers for 1,000 units in 5 s, then a 5 s browse
#   loadtest/run.sh --quick    500 buyers for 100 units in 3 s (CI), no browse
#   loadtest/run.sh --full     40,000 buyers for 10,000 units in 15 s, then browse
#
# Options:  --keep       keep the scratch database, Redis keys and logs
#           --browse / --no-browse   run loadtest/k6/browse.js after the sale or not
# Environment (each overrides the profile): STOCK, USERS, DURATION (k6 duration,
#   e.g. 5s), BROWSE_RATE (page views/s), BROWSE_DURATION, DRAIN_TIMEOUT (s, 120),
#   SECKILL_THREADS (gateway tokio threads; unset: the default), SECKILL_WORKERS,
#   LOGIN (1: each buyer registers and logs in for its JWT, see
#   loadtest/k6/flash_sale.js),
#   SECKILL_RATE_GLOBAL / _USER / _IP (0 = off, the default here: every buyer
#   comes from 127.0.0.1), SECKILL_REDIS_URL, LT_PG_SERVER
#   (postgres://postgres@127.0.0.1:5432).
#
# Steps: scripts/deps.sh; installs curl, jq and k6 when missing; cargo build
# --release; starts `seckill serve` (gateway and workers) on a free loopback
# port with its own key prefix and database; creates a promotion on sale since
# a minute ago for an hour; runs loadtest/k6/flash_sale.js; waits for the
# workers to persist every sold order; runs `seckill reconcile --promotion ID`;
# checks PostgreSQL for oversell, duplicates and every order id a 200 answered;
# prints a report; stops the gateway and drops the scratch state.
#
# Exit status 0 only when every k6 threshold held, reconcile found no drift,
# nothing was oversold, no confirmed order is missing from PostgreSQL, no buyer
# holds two orders, and (when run) the browse thresholds held.

set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

profile=default keep=0 browse=
for arg in "$@"; do
	case $arg in
	--quick) profile=quick ;;
	--full) profile=full ;;
	--keep) keep=1 ;;
	--browse) browse=1 ;;
	--no-browse) browse=0 ;;
	-h | --help)
		usage
		exit 0
		;;
	*) lt_die "unknown argument $arg (try --help)" ;;
	esac
done

case $profile in
quick) d_stock=100 d_users=500 d_duration=3s d_browse=0 ;;
default) d_stock=1000 d_users=5000 d_duration=5s d_browse=1 ;;
full) d_stock=10000 d_users=40000 d_duration=15s d_browse=1 ;;
esac
STOCK=${STOCK:-$d_stock}
USERS=${USERS:-$d_users}
DURATION=${DURATION:-$d_duration}
browse=${browse:-$d_browse}
BROWSE_RATE=${BROWSE_RATE:-500}
BROWSE_DURATION=${BROWSE_DURATION:-5s}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-120}
((USERS > STOCK)) || lt_die "USERS ($USERS) must exceed STOCK ($STOCK): the sale must sell out"

LT_KEEP=$keep
lt_exit_traps

lt_setup_path
lt_deps
lt_ensure_tools curl jq psql redis-cli k6
lt_build

lt_start_gateway gw serve
gw_pid=$(lt_pid gw)
promo=$(lt_create_promotion "loadtest flash sale" "$STOCK") || lt_die "cannot create the promotion"
lt_log "promotion $promo: $STOCK units; $USERS buyers arrive within $DURATION"

# --- the sale ---------------------------------------------------------------------
k6_rc=0
k6 run --quiet --no-color \
	--summary-export "$LT_DIR/sale.json" \
	--console-output "$LT_DIR/sale-console.log" \
	-e BASE_URL="$LT_URL" -e PROMOTION_ID="$promo" -e STOCK="$STOCK" \
	-e USERS="$USERS" -e DURATION="$DURATION" -e JWT_SECRET="$LT_JWT_SECRET" \
	-e ADMIN_TOKEN="$LT_ADMIN_TOKEN" -e LOG_ORDERS=1 -e LOGIN="${LOGIN:-0}" \
	loadtest/k6/flash_sale.js 2>&1 | tee "$LT_DIR/sale.txt" || k6_rc=$?
# (With pipefail the pipeline fails with k6's status: PIPESTATUS read after an
# `|| true` would be that of `true`, and hide a crossed threshold.)
grep -v '^time=.*msg="ORDER ' "$LT_DIR/sale-console.log" | sed 's/^/k6: /' >&2 || true

# --- the workers drain ------------------------------------------------------------------
drain_rc=0
drain_s=$(lt_wait_drained "$promo" "$DRAIN_TIMEOUT") || drain_rc=1
stats=$(lt_stats "$promo")
sold=$(jq -r .stats.sold <<<"$stats")
persisted=$(jq -r .stats.persisted <<<"$stats")
remaining=$(jq -r .stats.remaining <<<"$stats")
in_stream=$(jq -r .stats.in_stream <<<"$stats")
read -r rss_peak rss_now < <(lt_rss_mib "$gw_pid") || true

# --- reconcile ------------------------------------------------------------------------------
reconcile_rc=0
lt_env "$LT_BIN" reconcile --promotion "$promo" >"$LT_DIR/reconcile.txt" 2>"$LT_DIR/reconcile.err" ||
	reconcile_rc=$?
sed 's/^/reconcile: /' "$LT_DIR/reconcile.txt" >&2

# --- PostgreSQL: oversell, duplicates, every answered order id --------------------
grep -o 'msg="ORDER [0-9]* [^"]*"' "$LT_DIR/sale-console.log" |
	sed -E 's/^msg="ORDER ([0-9]+) ([^"]*)"$/\1,\2/' >"$LT_DIR/answered.csv" || true
IFS='|' read -r pg_rows dup_ids dup_users answered dup_answered lost_ids phantom sale_span < <(
	lt_psql <<SQL
CREATE TEMP TABLE answered (user_id BIGINT, order_id TEXT);
\copy answered FROM '$LT_DIR/answered.csv' WITH (FORMAT csv)
SELECT
  (SELECT count(*) FROM orders WHERE promotion_id = $promo),
  (SELECT count(*) - count(DISTINCT order_id) FROM orders WHERE promotion_id = $promo),
  (SELECT count(*) - count(DISTINCT user_id) FROM orders WHERE promotion_id = $promo),
  (SELECT count(*) FROM answered),
  (SELECT count(*) - count(DISTINCT order_id) FROM answered),
  (SELECT count(*) FROM answered a
     WHERE NOT EXISTS (SELECT 1 FROM orders o
                       WHERE o.order_id = a.order_id AND o.user_id = a.user_id
                         AND o.promotion_id = $promo)),
  (SELECT count(*) FROM orders o WHERE o.promotion_id = $promo
     AND NOT EXISTS (SELECT 1 FROM answered a WHERE a.order_id = o.order_id)),
  (SELECT coalesce(round(extract(epoch FROM max(created_at) - min(created_at))::numeric, 3), 0)
     FROM orders WHERE promotion_id = $promo);
SQL
)

# --- browse -----------------------------------------------------------------------------------
browse_rc=0
if ((browse)); then
	lt_log "browse: GET /api/promotions and /api/promotions/$promo at up to $BROWSE_RATE views/s for $BROWSE_DURATION"
	k6 run --quiet --no-color --summary-export "$LT_DIR/browse.json" \
		-e BASE_URL="$LT_URL" -e PROMOTION_ID="$promo" -e RATE="$BROWSE_RATE" \
		-e DURATION="$BROWSE_DURATION" loadtest/k6/browse.js >"$LT_DIR/browse.txt" 2>&1 ||
		browse_rc=$?
	((browse_rc == 0)) || tail -n 40 "$LT_DIR/browse.txt" >&2
fi

# --- report ------------------------------------------------------------------------------------
m() { jq -r --arg k "$1" --arg f "$2" '.metrics[$k][$f] // 0' "$LT_DIR/sale.json" 2>/dev/null || echo 0; }
ms() { awk -v v="$1" 'BEGIN { printf "%.1f ms", v }'; }
requests=$(m purchase_requests count)
req_rate=$(m purchase_requests rate)
ok=$(m purchases_ok count)
max_seen=$(printf '%s\n' "$sold" "$pg_rows" "$ok" | sort -n | tail -n1)
oversell=$((max_seen > STOCK ? max_seen - STOCK : 0))
lost=$((sold - persisted))
((lost_ids > lost)) && lost=$lost_ids
purchase_rate=$(awk -v n="$pg_rows" -v s="$sale_span" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print "n/a" }')
errors=$(($(m server_errors count) + $(m transport_errors count) + $(m unexpected_status count)))

verdict() { if [[ $1 == 0 ]]; then echo ok; else echo FAIL; fi; }
{
	echo
	echo "================ seckill load test ($profile) ================"
	printf '%-34s %s\n' "gateway" "$LT_URL, SECKILL_THREADS=${SECKILL_THREADS:-default}, workers in process, rate limits global=${SECKILL_RATE_GLOBAL:-0} user=${SECKILL_RATE_USER:-0} ip=${SECKILL_RATE_IP:-0}"
	printf '%-34s %s\n' "sale" "promotion $promo: $STOCK units, $(m buyers count) buyers arrived in $DURATION ($(m dropped_iterations count) dropped by k6)"
	printf '%-34s %s\n' "purchase requests" "$requests ($(printf '%.0f' "$req_rate")/s over the k6 run; winners click twice)"
	printf '%-34s %s\n' "answers" "200: $ok  409: $(m already_purchased count)  410: $(m sold_out count)  5xx: $(m server_errors count) (503: $(m unavailable_503 count))  other: $(m unexpected_status count)  transport errors: $(m transport_errors count)"
	printf '%-34s %s\n' "purchases/s while stock lasted" "$purchase_rate ($pg_rows orders within ${sale_span}s, Redis clock)"
	printf '%-34s %s\n' "purchase latency" "p50 $(ms "$(m purchase_latency med)")  p95 $(ms "$(m purchase_latency 'p(95)')")  p99 $(ms "$(m purchase_latency 'p(99)')")  max $(ms "$(m purchase_latency max)")"
	printf '%-34s %s\n' "errors (5xx, transport, unexpected)" "$errors   (must be 0)  $(verdict "$errors")"
	printf '%-34s %s\n' "oversell" "$oversell   (must be 0: Redis sold $sold, PostgreSQL $pg_rows, k6 200s $ok, stock $STOCK)  $(verdict "$oversell")"
	printf '%-34s %s\n' "lost orders" "$lost   (must be 0: sold - persisted = $((sold - persisted)); answered ids missing from PostgreSQL $lost_ids of $answered)  $(verdict "$lost")"
	printf '%-34s %s\n' "duplicates" "buyers with two orders $dup_users, repeated order ids $dup_ids in PostgreSQL / $dup_answered in answers, orders nobody was told of $phantom  $(verdict $((dup_users + dup_ids + dup_answered + phantom)))"
	printf '%-34s %s\n' "workers drained" "${drain_s}s after the sale ended (persisted $persisted of $sold, in stream $in_stream, remaining $remaining)  $(verdict "$drain_rc")"
	printf '%-34s %s\n' "reconcile" "$(tail -n1 "$LT_DIR/reconcile.txt" 2>/dev/null) (exit $reconcile_rc)  $(verdict "$reconcile_rc")"
	printf '%-34s %s\n' "k6 thresholds" "exit $k6_rc  $(verdict "$k6_rc")"
	printf '%-34s %s\n' "gateway memory" "peak RSS ${rss_peak:-?} MiB, now ${rss_now:-?} MiB"
	if ((browse)); then
		b() { jq -r --arg k "$1" --arg f "$2" '.metrics[$k][$f] // 0' "$LT_DIR/browse.json" 2>/dev/null || echo 0; }
		printf '%-34s %s\n' "browse" "$(printf '%.0f' "$(b http_reqs rate)") req/s, list p50 $(ms "$(b browse_list_latency med)") p99 $(ms "$(b browse_list_latency 'p(99)')"), item p99 $(ms "$(b browse_item_latency 'p(99)')"), failed $(b http_req_failed value)  $(verdict "$browse_rc")"
	fi
	echo "=============================================================="
} | tee "$LT_DIR/report.txt"

status=$((k6_rc != 0 || reconcile_rc != 0 || oversell > 0 || lost > 0 || drain_rc != 0 ||
	dup_users + dup_ids + dup_answered + phantom > 0 || browse_rc != 0))
if ((status)); then
	echo "RESULT: FAIL"
	exit 1
fi
echo "RESULT: PASS"
