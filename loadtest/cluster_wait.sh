#!/usr/bin/env bash
# loadtest/cluster_wait.sh — what SECKILL_REDIS_WAIT_REPLICAS costs, on a local
# Redis Cluster of three primaries with one replica each (loopback, this box).
#
#   loadtest/cluster_wait.sh             # 10 s per setting, 50 connections
#   SECONDS_EACH=5 CONNS=20 loadtest/cluster_wait.sh
#
# Starts six redis-server nodes on ports CLUSTER_BASE..+5 (default 7300) in a
# scratch directory, joins them (`redis-cli --cluster create --cluster-replicas
# 1`), then for WAIT 0 and WAIT 1 in turn: starts `seckill serve` on the
# cluster, creates a promotion with more stock than the run can sell, drives
# it with wrk (every request a distinct buyer) and prints purchases/s (200s
# counted by the gateway per second of the run) and wrk's p50/p99. The nodes,
# the gateway, the scratch database and the files go at the end.
#
# Variables: SECONDS_EACH [10], CONNS [50], CLUSTER_BASE [7300], USERS [400000].
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

SECONDS_EACH=${SECONDS_EACH:-10}
CONNS=${CONNS:-50}
CLUSTER_BASE=${CLUSTER_BASE:-7300}
USERS=${USERS:-400000}

lt_setup_path
lt_ensure_tools curl jq wrk redis-cli psql
lt_deps
lt_build

NODE_PIDS=()
stop_cluster() {
	local pid
	for pid in "${NODE_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
	rm -rf "$LT_DIR/cluster"
}
LT_EXTRA_CLEANUP=stop_cluster
lt_exit_traps

mkdir -p "$LT_DIR/cluster"
addrs=() urls=()
for i in 0 1 2 3 4 5; do
	port=$((CLUSTER_BASE + i))
	redis-cli -p "$port" PING >/dev/null 2>&1 && lt_die "port $port is taken; set CLUSTER_BASE"
	redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
		--cluster-config-file "nodes-$port.conf" --cluster-node-timeout 2000 \
		--save "" --appendonly no --dir "$LT_DIR/cluster" >"$LT_DIR/cluster/$port.log" 2>&1 &
	NODE_PIDS+=("$!")
	addrs+=("127.0.0.1:$port")
	urls+=("redis://127.0.0.1:$port")
done
for a in "${addrs[@]}"; do
	for _ in $(seq 100); do redis-cli -p "${a#*:}" PING >/dev/null 2>&1 && break; sleep 0.1; done
done
redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$LT_DIR/cluster/create.log"
for a in "${addrs[@]}"; do
	for _ in $(seq 300); do
		redis-cli -p "${a#*:}" CLUSTER INFO | grep -q cluster_state:ok && break
		sleep 0.1
	done
done
LT_REDIS_URL=$(
	IFS=,
	echo "${urls[*]}"
)
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
