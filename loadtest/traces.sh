#!/usr/bin/env bash
# loadtest/traces.sh — what trace export costs: purchases/s of one gateway
# with tracing off, then with every span exported over OTLP (http/protobuf)
# to a local receiver. A figure, not a test.
#
#   loadtest/traces.sh         two wrk runs of TRACES_SECONDS each
#
# Each run: `seckill serve --no-workers` on a free loopback port (its own key
# prefix and database, shared by both runs), a promotion with a stock larger
# than the run can sell, and wrk (one thread, TRACES_CONNECTIONS connections)
# sending purchases, each with a distinct buyer's JWT (`seckill tokens`). The
# traced run sets OTEL_EXPORTER_OTLP_ENDPOINT to a receiver on loopback (a
# small Python HTTP server that accepts `POST /v1/traces` and answers 200; it
# shares the two cores with everything else, as Jaeger would) and prints the
# spans exported and dropped.
#
# Environment:
#   TRACES_SECONDS      length of each wrk run                          [10]
#   TRACES_CONNECTIONS  wrk connections                                 [50]
#   TRACES_BUYERS       distinct buyers per run (size it above what a run sells) [400000]
#   TRACES_PROTOCOL     http/protobuf (the Python receiver speaks only that) [http/protobuf]
#
# Installs wrk, curl and jq when missing; builds with cargo build --release.

set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

SECS=${TRACES_SECONDS:-10}
CONNS=${TRACES_CONNECTIONS:-50}
BUYERS=${TRACES_BUYERS:-400000}

lt_setup_path
lt_deps
lt_ensure_tools curl jq wrk
lt_build
lt_exit_traps

# The OTLP receiver: accepts any POST /v1/traces, reads it whole, answers an
# empty ExportTraceServiceResponse (zero bytes of protobuf).
sink_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 - "$sink_port" >"$LT_DIR/sink.log" 2>&1 <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
sink_pid=$!
trap 'kill "$sink_pid" 2>/dev/null || true; lt_on_exit' EXIT

# run NAME FIRST_USER: purchases/s of one wrk run against a fresh gateway.
run() {
	local name=$1 first=$2 id
	lt_env "$LT_BIN" tokens --users "$BUYERS" --first "$first" >"$LT_DIR/$name.csv"
	lt_start_gateway "$name" serve --no-workers
	id=$(lt_create_promotion "$name" "$((BUYERS * 2))")
	wrk -t1 -c"$CONNS" -d"${SECS}s" --timeout 10s -s loadtest/wrk/tokens.lua "$LT_URL" \
		-- POST "/api/promotions/$id/purchase" "$LT_DIR/$name.csv" 1 >"$LT_DIR/$name.wrk" 2>&1 ||
		lt_die "wrk failed: $(tail -n 5 "$LT_DIR/$name.wrk")"
	curl -sf "$LT_URL/metrics" >"$LT_DIR/$name.metrics"
	lt_stop "$name"
}
rps() { awk '$1 == "requests" { printf "%.0f", $2 / ($4 / 1e6) }' "$LT_DIR/$1.wrk"; }
p99() { awk '$1 == "latency_us" { printf "%.2f", $4 / 1000 }' "$LT_DIR/$1.wrk"; }
bought() { awk '/^seckill_purchases_total\{outcome="bought"\}/ { print $NF }' "$LT_DIR/$1.metrics"; }
metric() { awk -v m="$2" 'index($0, m) == 1 { print $NF }' "$LT_DIR/$1.metrics"; }

lt_log "run 1/2: tracing off"
run off 1
lt_log "run 2/2: tracing on, OTLP ${TRACES_PROTOCOL:-http/protobuf} to 127.0.0.1:$sink_port"
export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port
export OTEL_EXPORTER_OTLP_PROTOCOL=${TRACES_PROTOCOL:-http/protobuf}
export OTEL_SERVICE_NAME=seckill-loadtest
run on "$((BUYERS + 1))"
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_PROTOCOL OTEL_SERVICE_NAME

off=$(rps off) on=$(rps on)
echo ""
echo "trace export cost, $(nproc) cores shared by wrk, the gateway, Redis and the receiver; ${SECS}s each, $CONNS connections"
printf '  %-12s %10s purchases/s (wrk), p99 %s ms, bought %s\n' "tracing off" "$off" "$(p99 off)" "$(bought off)"
printf '  %-12s %10s purchases/s (wrk), p99 %s ms, bought %s\n' "tracing on" "$on" "$(p99 on)" "$(bought on)"
printf '  %-12s %10s\n' "on / off" "$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.2f", a / b }')"
echo "  spans exported $(metric on seckill_trace_spans_exported_total), dropped: queue full $(metric on 'seckill_trace_spans_dropped_total{reason="queue_full"}'), export failed $(metric on 'seckill_trace_spans_dropped_total{reason="export_failed"}')"
