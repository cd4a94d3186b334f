#!/usr/bin/env bash
# loadtest/scale.sh — one Redis node against a Redis Cluster, in one run, on
# this machine: the figures the capacity model of docs/scale-out.md starts
# from.
#
#   loadtest/scale.sh                 # 8 s per measurement, 50 connections
#   SECONDS_EACH=5 loadtest/scale.sh
#
# Starts, in a scratch directory on spare ports, one standalone redis-server
# and a cluster of three primaries with one replica each (`redis-cli
# --cluster create --cluster-replicas 1`). Against each in turn it starts
# `seckill serve --no-workers` (its default threads) and measures with wrk
# (one thread, every request a distinct buyer's JWT):
#   - purchases/s of a promotion with more stock than the run can sell;
#   - on the cluster, the same with `buckets: 3` (the stock over the three
#     primaries) and with SECKILL_REDIS_WAIT_REPLICAS=1 (the cost of WAIT);
#   - sold-out rejections/s of a promotion whose one unit is gone.
# Each line: the rate (answers with the expected status per second, counted
# by the gateway's /metrics), wrk's p50/p99, and the Redis calls per purchase
# (`seckill_lua_seconds_count` per 200). Then redis-benchmark of
# lua/purchase.lua on the standalone node (one buyer a call): the per-call
# cost the model uses. Everything started goes at the end.
#
# Variables: SECONDS_EACH [8], CONNS [50], USERS [2500000] (distinct buyers:
# about 50,000 a second of each purchase measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

SECONDS_EACH=${SECONDS_EACH:-8}
CONNS=${CONNS:-50}
USERS=${USERS:-2500000}

lt_setup_path
lt_ensure_tools curl jq wrk redis-cli redis-server redis-benchmark psql
lt_deps
lt_build

lt_exit_traps

single=$(lt_spare_port)
lt_start_redis "$single"
lt_start_cluster 3 1
CLUSTER_URL=$LT_CLUSTER_URL
lt_log "standalone on $single; cluster $CLUSTER_URL"

lt_env "$LT_BIN" tokens --users "$USERS" >"$LT_DIR/tokens.csv"
# wrk sends lines in order: each measurement gets a slice of its own.
next=1
slice() {
	local n=$1
	awk -v a="$next" -v b=$((next + n)) 'NR >= a && NR < b' "$LT_DIR/tokens.csv" >"$LT_DIR/slice.csv"
	next=$((next + n))
}

# create NAME STOCK BUCKETS: a promotion on sale now; prints its id.
create() {
	local starts ends
	starts=$(date -u -d '-1 min' +%Y-%m-%dT%H:%M:%SZ)
	ends=$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)
	lt_admin POST /admin/promotions "$(jq -nc --arg n "$1" --argjson s "$2" --argjson b "$3" \
		--arg st "$starts" --arg e "$ends" \
		'{name: $n, stock: $s, per_user_limit: 1, buckets: $b, starts_at: $st, ends_at: $e}')" | jq -er .id
}

metric() { # FILE STATUS: purchase answers with that status
	awk -v s="status=\"$2\"" '/^seckill_http_requests_total\{/ && /purchase/ && index($0, s) { n += $NF } END { print n + 0 }' "$1"
}
calls() { awk '/^seckill_lua_seconds_count\{/ && /script="purchase"/ { n += $NF } END { print n + 0 }' "$1"; }

# measure LABEL ID STATUS [any]: wrk on the purchase route of promotion ID,
# every request a buyer not seen before, or with "any" (a sold-out crowd,
# refused before its buyer matters) buyers from the start of the file again.
measure() {
	local label=$1 id=$2 status=$3 secs p50 p99 ok c rate per
	if [[ ${4:-} == any ]]; then
		head -n $((SECONDS_EACH * 150000)) "$LT_DIR/tokens.csv" >"$LT_DIR/slice.csv"
	else
		slice $((SECONDS_EACH * 50000))
	fi
	curl -sf "$LT_URL/metrics" >"$LT_DIR/pre"
	wrk -t1 -c"$CONNS" -d"${SECONDS_EACH}s" --timeout 10s -s loadtest/wrk/tokens.lua "$LT_URL" \
		-- POST "/api/promotions/$id/purchase" "$LT_DIR/slice.csv" 1 >"$LT_DIR/wrk.txt" 2>&1
	curl -sf "$LT_URL/metrics" >"$LT_DIR/post"
	secs=$(awk '$1 == "requests" { printf "%.3f", $4 / 1e6 }' "$LT_DIR/wrk.txt")
	p50=$(awk '$1 == "latency_us" { printf "%.2f", $2 / 1000 }' "$LT_DIR/wrk.txt")
	p99=$(awk '$1 == "latency_us" { printf "%.2f", $4 / 1000 }' "$LT_DIR/wrk.txt")
	ok=$(($(metric "$LT_DIR/post" "$status") - $(metric "$LT_DIR/pre" "$status")))
	c=$(($(calls "$LT_DIR/post") - $(calls "$LT_DIR/pre")))
	rate=$(awk -v n="$ok" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
	# every purchase answer by status, for the log
	awk 'FNR == 1 { f++ } /^seckill_http_requests_total\{/ && /purchase/ {
		match($0, /status="[0-9]+"/); k = substr($0, RSTART + 8, 3); if (f == 1) b[k] += $NF; else a[k] += $NF }
		END { for (k in a) if (a[k] - b[k] > 0) printf "%s:%d ", k, a[k] - b[k]; print "" }' \
		"$LT_DIR/pre" "$LT_DIR/post" >"$LT_DIR/statuses"
	lt_log "$label: $(cat "$LT_DIR/statuses")"
	per=$(awk -v c="$c" -v n="$ok" 'BEGIN { if (n > 0) printf "%.3f", c / n; else print "-" }')
	printf '  %-44s %8s/s   p50 %6s ms  p99 %6s ms  script calls per answer %s\n' \
		"$label" "$rate" "$p50" "$p99" "$per" | tee -a "$LT_DIR/report.txt"
}

soldout() { # LABEL BUCKETS
	local id
	id=$(create "sold out" 1 "$2")
	# sell the unit, then measure the crowd that comes after
	slice 50
	curl -s -o /dev/null -X POST "$LT_URL/api/promotions/$id/purchase" \
		-H "Authorization: Bearer $(head -1 "$LT_DIR/slice.csv" | cut -d, -f2)" -H 'Content-Type: application/json' -d '{}'
	measure "$1" "$id" 410 any
}

: >"$LT_DIR/report.txt"
say() { printf '%s\n' "$*" | tee -a "$LT_DIR/report.txt"; }
say "seckill scale: one node vs a 3-primary cluster (+3 replicas), $(nproc) cores, wrk -c$CONNS ${SECONDS_EACH}s, same run"

say "one Redis node"
LT_REDIS_URL=redis://127.0.0.1:$single lt_start_gateway one serve --no-workers
measure "purchases" "$(create one 100000000 1)" 200
soldout "sold-out rejections" 1
lt_stop one

say "Redis Cluster, 3 primaries"
LT_REDIS_URL=$CLUSTER_URL lt_start_gateway cl serve --no-workers
measure "purchases" "$(create cl 100000000 1)" 200
measure "purchases, buckets 3" "$(create cl3 100000000 3)" 200
soldout "sold-out rejections" 1
lt_stop cl
LT_REDIS_URL=$CLUSTER_URL SECKILL_REDIS_WAIT_REPLICAS=1 lt_start_gateway clw serve --no-workers
measure "purchases, SECKILL_REDIS_WAIT_REPLICAS=1" "$(create clw 100000000 1)" 200
lt_stop clw

say "redis-benchmark, one node, lua/purchase.lua one buyer a call (50 clients)"
sha=$(redis-cli -p "$single" SCRIPT LOAD "$(cat lua/purchase.lua)")
now=$(($(date +%s) * 1000))
redis-cli -p "$single" HSET '{b}:meta' id 1 starts_ms $((now - 60000)) ends_ms $((now + 3600000)) limit 1 \
	price_cents 1 stock 100000000 sold 0 returned 0 >/dev/null
redis-cli -p "$single" SET '{b}:stock' 100000000 >/dev/null
rps=$(redis-benchmark -p "$single" -c 50 -n 200000 -r 100000000 --csv EVALSHA "$sha" 6 \
	'{b}:meta' '{b}:stock' '{b}:buyers' '{b}:orders' '{b}:results' '{b}:won' \
	1 __rand_int__ o:__rand_int__ 2>/dev/null | awk -F'"' 'NR == 2 { printf "%.0f", $4 }')
say "  calls/s                                      ${rps}/s"
say ""
cat "$LT_DIR/report.txt" >"${SCALE_REPORT:-/dev/null}"
