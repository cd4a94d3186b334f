#!/usr/bin/env bash
# loadtest/cluster_wait.sh — what SECKILL_REDIS_WAIT_REPLICAS costs, on a local
# Redis Cluster of three primaries with one replica each (loopback, this box).
#
#   loadtest/cluster_wait.sh             # 10 s per setting, 50 connections
#   SECONDS_EACH=5 CONNS=20 loadtest/cluster_wait.sh
#
# Starts six redis-server nodes on spare ports in a scratch directory
# (lt_start_cluster), joins them (`redis-cli --cluster create --cluster-replicas
# 1`), then for WAIT 0 and WAIT 1 in turn: starts `seckill serve` on the
# cluster, creates a promotion with more stock than the run can sell, drives
# it with wrk (every request a distinct buyer) and prints purchases/s (200s
# counted by the gateway per second of the run) and wrk's p50/p99. The nodes,
# the gateway, the scratch database and the files go at the end.
#
# Variables: SECONDS_EACH [10], CONNS [50], USERS [400000].
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

SECONDS_EACH=${SECONDS_EACH:-10}
CONNS=${CONNS:-50}
USERS=${USERS:-400000}

lt_setup_path
lt_ensure_tools curl jq wrk redis-cli psql
lt_deps
lt_build

lt_exit_traps

lt_start_cluster 3 1
LT_REDIS_URL=$LT_CLUSTER_URL
lt_log "cluster up: $LT_REDIS_URL"

lt_env "$LT_BIN" tokens --users "$USERS" >"$LT_DIR/tokens.csv"

results=()
for wait in 0 1; do
	SECKILL_REDIS_WAIT_REPLICAS=$wait lt_start_gateway "gw$wait" serve
	id=$(lt_create_promotion "wait $wait" 10000000 1)
	curl -sf "$LT_URL/metrics" >"$LT_DIR/gw$wait.pre"
	wrk -t1 -c"$CONNS" -d"${SECONDS_EACH}s" --timeout 10s -s loadtest/wrk/tokens.lua "$LT_URL" \
		-- POST "/api/promotions/$id/purchase" "$LT_DIR/tokens.csv" 1 >"$LT_DIR/gw$wait.wrk" 2>&1
	curl -sf "$LT_URL/metrics" >"$LT_DIR/gw$wait.post"
	secs=$(awk '$1 == "requests" { printf "%.3f", $4 / 1e6 }' "$LT_DIR/gw$wait.wrk")
	p50=$(awk '$1 == "latency_us" { printf "%.2f", $2 / 1000 }' "$LT_DIR/gw$wait.wrk")
	p99=$(awk '$1 == "latency_us" { printf "%.2f", $4 / 1000 }' "$LT_DIR/gw$wait.wrk")
	ok=$(awk '
		FNR == 1 { file++ }
		/^seckill_http_requests_total\{/ && /status="200"/ && /purchase/ {
			if (file == 1) b += $NF; else a += $NF }
		END { print a - b }' "$LT_DIR/gw$wait.pre" "$LT_DIR/gw$wait.post")
	other=$(awk '
		FNR == 1 { file++ }
		/^seckill_http_requests_total\{/ && !/status="200"/ && /purchase/ {
			if (file == 1) b += $NF; else a += $NF }
		END { print a - b }' "$LT_DIR/gw$wait.pre" "$LT_DIR/gw$wait.post")
	rate=$(awk -v n="$ok" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
	results+=("WAIT $wait: $rate purchases/s ($ok x 200, $other other answers in ${secs}s), p50 ${p50} ms, p99 ${p99} ms")
	lt_stop "gw$wait"
done
printf '%s\n' "cluster: 3 primaries + 3 replicas on loopback, $CONNS connections, ${SECONDS_EACH}s each" "${results[@]}"
