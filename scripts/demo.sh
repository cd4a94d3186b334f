#!/usr/bin/env bash
# scripts/demo.sh — run the gateway with a working demo.
#
#   1. scripts/deps.sh (Redis and PostgreSQL up), database created if absent
#   2. cargo build --release
#   3. target/release/seckill serve in the background, wait for /health
#   4. create a demo promotion (100 phones, 1 per user, on sale now for 1 h),
#      mint a JWT for user 42, print the sale page's and the operator
#      console's addresses and ready-to-paste curl commands
#   5. wait for the server in the foreground; Ctrl-C (or TERM/HUP) is passed on
#      as SIGTERM so it shuts down gracefully; exits with the server's status.
#
#   scripts/demo.sh --cluster   the same on a local Redis Cluster: three
#      primaries (redis-server --cluster-enabled yes, daemonized, on loopback
#      ports SECKILL_DEMO_CLUSTER_PORT..+2, files under
#      $SECKILL_STATE_DIR/cluster), joined with redis-cli --cluster create
#      unless they already form a cluster; SECKILL_REDIS_URL lists the three.
#      The nodes keep running after the demo, as deps.sh's Redis does; stop
#      them with `redis-cli -p PORT shutdown nosave` for each port.
#
# Environment (defaults in brackets; all passed on to the server):
#   SECKILL_LISTEN        [127.0.0.1:8080]  must be a fixed port
#   SECKILL_REDIS_URL     [redis://127.0.0.1:6379]
#   SECKILL_DATABASE_URL  [postgres://postgres@127.0.0.1:5432/seckill]
#   SECKILL_ADMIN_TOKEN   [demo-admin-token]
#   SECKILL_JWT_SECRET    [demo-jwt-secret]
#   SECKILL_DEMO_USER     [42] user id of the printed token
#   SECKILL_DEMO_CLUSTER_PORT [7000] first port of the --cluster nodes

# shellcheck disable=SC2317 # functions below are run by traps
set -euo pipefail
cd "$(dirname "$0")/.."

export SECKILL_LISTEN=${SECKILL_LISTEN:-127.0.0.1:8080}
export SECKILL_REDIS_URL=${SECKILL_REDIS_URL:-redis://127.0.0.1:6379}
export SECKILL_DATABASE_URL=${SECKILL_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/seckill}
export SECKILL_ADMIN_TOKEN=${SECKILL_ADMIN_TOKEN:-demo-admin-token}
export SECKILL_JWT_SECRET=${SECKILL_JWT_SECRET:-demo-jwt-secret}
# Real secrets make logs JSON by default; a demo is read by a person.
export SECKILL_LOG_FORMAT=${SECKILL_LOG_FORMAT:-text}
demo_user=${SECKILL_DEMO_USER:-42}
cluster=0
case ${1:-} in
--cluster) cluster=1 ;;
"") ;;
*)
	printf 'usage: scripts/demo.sh [--cluster]\n' >&2
	exit 2
	;;
esac
base_url=http://$SECKILL_LISTEN

log() { printf 'demo: %s\n' "$*"; }
die() {
	printf 'demo: error: %s\n' "$*" >&2
	exit 1
}
# Single-quote a string for the shell (for the printed commands).
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

[[ $SECKILL_LISTEN == *:0 ]] && die "SECKILL_LISTEN=$SECKILL_LISTEN: the demo needs a fixed port"

# --- 1. services and database ------------------------------------------------

# deps.sh takes the PostgreSQL host/port from SECKILL_DATABASE_URL.
env -u SECKILL_PG_HOST -u SECKILL_PG_PORT scripts/deps.sh

# A local Redis Cluster of three primaries, for --cluster.
start_cluster() {
	local first=${SECKILL_DEMO_CLUSTER_PORT:-7000} dir port i addrs=() urls=()
	dir=${SECKILL_STATE_DIR:-${HOME:-/tmp}/.local/state/seckill}/cluster
	command -v redis-cli >/dev/null 2>&1 || die "redis-cli is needed for --cluster (apt-get install redis-tools)"
	mkdir -p "$dir"
	for port in "$first" $((first + 1)) $((first + 2)); do
		addrs+=("127.0.0.1:$port")
		urls+=("redis://127.0.0.1:$port")
		redis-cli -p "$port" PING >/dev/null 2>&1 && continue
		log "starting cluster node 127.0.0.1:$port (files in $dir)"
		redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
			--cluster-config-file "nodes-$port.conf" --cluster-node-timeout 2000 \
			--appendonly yes --appendfsync everysec --dir "$dir" \
			--daemonize yes --logfile "$dir/$port.log" >/dev/null
		for ((i = 0; i < 50; i++)); do
			redis-cli -p "$port" PING >/dev/null 2>&1 && break
			sleep 0.1
		done
	done
	if ! redis-cli -p "$first" CLUSTER INFO | grep -q 'cluster_state:ok'; then
		if [[ $(redis-cli -p "$first" CLUSTER INFO | awk -F: '/cluster_known_nodes/ { print $2 + 0 }') -le 1 ]]; then
			log "joining ${addrs[*]} into a cluster"
			redis-cli --cluster create "${addrs[@]}" --cluster-yes >"$dir/create.log" 2>&1 ||
				die "redis-cli --cluster create failed (log: $dir/create.log)"
		fi
		for ((i = 0; i < 100; i++)); do
			redis-cli -p "$first" CLUSTER INFO | grep -q 'cluster_state:ok' && break
			sleep 0.2
		done
		redis-cli -p "$first" CLUSTER INFO | grep -q 'cluster_state:ok' ||
			die "the cluster on ${addrs[*]} is not ok (redis-cli -p $first cluster info)"
	fi
	SECKILL_REDIS_URL=$(
		IFS=,
		echo "${urls[*]}"
	)
	export SECKILL_REDIS_URL
	log "Redis Cluster: $SECKILL_REDIS_URL"
}
((cluster)) && start_cluster

# psql may live only in /usr/lib/postgresql/VER/bin.
pg_bin=
for d in /usr/lib/postgresql/*/bin; do
	if [[ -x $d/psql ]]; then pg_bin=$d; fi
done
if [[ -n $pg_bin && :$PATH: != *":$pg_bin:"* ]]; then PATH=$PATH:$pg_bin; fi

if ! command -v curl >/dev/null 2>&1; then
	[[ $(id -u) -eq 0 ]] || die "curl is needed; install it (apt-get install curl)"
	log "installing curl"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null 2>&1 || {
		apt-get update -qq >/dev/null 2>&1
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
	}
fi

# Create the database named in SECKILL_DATABASE_URL if it does not exist,
# connecting to the maintenance database "postgres" on the same server.
create_database() {
	local url=$SECKILL_DATABASE_URL scheme rest query='' authority db='' admin_url exists
	scheme=${url%%://*}
	rest=${url#*://}
	[[ $rest == *\?* ]] && query=${rest#*\?}
	rest=${rest%%\?*}
	authority=${rest%%/*}
	[[ $rest == */* ]] && db=${rest#*/}
	[[ -n $db ]] || return 0 # none named: the server uses the user's default
	admin_url="$scheme://$authority/postgres${query:+?$query}"
	export PGCONNECT_TIMEOUT=5
	exists=$(psql -w -X -At -v ON_ERROR_STOP=1 -v db="$db" -d "$admin_url" <<<"SELECT 1 FROM pg_database WHERE datname = :'db';") ||
		die "cannot query databases on $admin_url"
	if [[ $exists != 1 ]]; then
		psql -w -X -q -v ON_ERROR_STOP=1 -v db="$db" -d "$admin_url" <<<'CREATE DATABASE :"db";' ||
			die "cannot create database $db"
		log "created database $db"
	fi
}
create_database

# --- 2. build ------------------------------------------------------------------

cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
if [[ -d $cargo_bin && :$PATH: != *":$cargo_bin:"* ]]; then
	PATH=$cargo_bin:$PATH
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust with rustup"
cargo build --release
bin=${CARGO_TARGET_DIR:-target}/release/seckill
[[ -x $bin ]] || die "$bin not found after the build"

# --- 3. start the gateway --------------------------------------------------------

# An old gateway still on that port would answer our health check.
if curl -s -o /dev/null --max-time 2 "$base_url/health"; then
	die "something already answers on $SECKILL_LISTEN; stop it or set SECKILL_LISTEN"
fi

# setsid: the server gets its own session, so a Ctrl-C in the terminal reaches
# only this script, which passes it on exactly once (as SIGTERM; background
# jobs of a script start with SIGINT ignored).
setsid "$bin" serve &
server_pid=$!
signals=0
interrupted=0

forward() {
	interrupted=1
	signals=$((signals + 1))
	kill -0 "$server_pid" 2>/dev/null || return 0
	if ((signals < 3)); then
		log "stopping the gateway (pid $server_pid) gracefully..."
		kill -TERM "$server_pid" 2>/dev/null || true
	else
		log "killing the gateway (pid $server_pid)"
		kill -KILL "$server_pid" 2>/dev/null || true
	fi
}
trap forward INT TERM HUP

# If this script fails before the final wait, do not leave the server behind.
cleanup() {
	if kill -0 "$server_pid" 2>/dev/null; then
		kill -TERM "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
}
trap cleanup EXIT

healthy=0
for ((i = 0; i < 60; i++)); do # 30 s
	if ! kill -0 "$server_pid" 2>/dev/null; then
		rc=0
		wait "$server_pid" || rc=$?
		die "the gateway exited during start-up (status $rc)"
	fi
	if curl -fs -o /dev/null --max-time 1 "$base_url/health"; then
		healthy=1
		break
	fi
	sleep 0.5
done
((healthy)) || die "the gateway did not answer $base_url/health within 30 s"

# --- 4. demo promotion and user token ------------------------------------------------

starts_at=$(date -u -d '-1 min' +%Y-%m-%dT%H:%M:%SZ)
ends_at=$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)
body=$(printf '{"name":"Demo phone flash sale","stock":100,"per_user_limit":1,"price_cents":99900,"starts_at":"%s","ends_at":"%s"}' \
	"$starts_at" "$ends_at")
answer=$(curl -s -X POST "$base_url/admin/promotions" \
	-H "Authorization: Bearer $SECKILL_ADMIN_TOKEN" \
	-H 'Content-Type: application/json' \
	-d "$body" -w '\n%{http_code}') || die "POST /admin/promotions failed"
status=${answer##*$'\n'}
json=${answer%$'\n'*}
[[ $status == 201 ]] || die "POST /admin/promotions answered $status: $json"

if command -v python3 >/dev/null 2>&1; then
	promo_id=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])' <<<"$json")
else
	promo_id=$(sed -n 's/.*"id"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p' <<<"$json")
fi
[[ $promo_id =~ ^[0-9]+$ ]] || die "no id in the answer: $json"

# The token is the last non-empty line the command prints.
token=$("$bin" token --user "$demo_user" --ttl 3600 | awk 'NF { last = $0 } END { print last }')
token=${token//[[:space:]]/}
[[ -n $token ]] || die "seckill token printed nothing"

user_auth=$(sq "Authorization: Bearer $token")
admin_auth=$(sq "Authorization: Bearer $SECKILL_ADMIN_TOKEN")

cat <<EOF

==============================================================================
 seckill demo: gateway at $base_url (pid $server_pid); Ctrl-C stops it.
 Promotion $promo_id "Demo phone flash sale": 100 in stock, 1 per user,
 on sale until $ends_at. The token below is user $demo_user's, valid 1 hour.

 Sale page:        $base_url/
                   (create an account in the page, then buy)
 Operator console: $base_url/console/
                   (admin token: the value of SECKILL_ADMIN_TOKEN)
==============================================================================

# Buy (a second time: 409 already_purchased)
curl -s -w '\n' -X POST $base_url/api/promotions/$promo_id/purchase -H $user_auth -H 'Content-Type: application/json' -d '{}'

# The result of my purchase (pending until the order is in PostgreSQL, then confirmed)
curl -s -w '\n' $base_url/api/promotions/$promo_id/result -H $user_auth

# My orders
curl -s -w '\n' $base_url/api/orders -H $user_auth

# Admin: the promotion with its stats
curl -s -w '\n' $base_url/admin/promotions/$promo_id -H $admin_auth

# Another user's token: $bin token --user 43
==============================================================================

EOF

# --- 5. wait for the server --------------------------------------------------------------

# `wait` returns early (status > 128) when a trapped signal arrives; then wait
# again for the server's own exit status (bash keeps it even when the process
# has already been reaped).
rc=0
while :; do
	interrupted=0
	rc=0
	wait "$server_pid" || rc=$?
	((rc > 128 && interrupted)) || break
done
trap - EXIT
log "gateway exited with status $rc"
exit "$rc"
