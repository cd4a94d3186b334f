#!/usr/bin/env bash
# scripts/deps.sh — make sure Redis and PostgreSQL answer on loopback.
#
# Idempotent: when both services already answer it only prints one line per
# service and exits 0. Otherwise it installs what is missing (apt-get, Debian)
# and starts what is down, then waits until each service answers.
#
# Targets (environment):
#   SECKILL_REDIS_URL   Redis to check/start; only host and port are used
#                       (a password in the URL is used for the PING).
#                       Default redis://127.0.0.1:6379.
#   SECKILL_PG_HOST     PostgreSQL host. Default: host of SECKILL_DATABASE_URL
#                       when that is set, else 127.0.0.1.
#   SECKILL_PG_PORT     PostgreSQL port. Default: port of SECKILL_DATABASE_URL
#                       when that is set, else 5432.
#   SECKILL_STATE_DIR   where privately started services keep their data and
#                       logs. Default $HOME/.local/state/seckill
#                       (redis/ and redis/redis.log, pg/ and pg.log).
#
# Redis: if nothing answers PING, install redis-server if needed and start a
# daemonized redis-server bound to loopback with AOF persistence
# (appendfsync everysec) in $SECKILL_STATE_DIR/redis.
#
# PostgreSQL: if pg_isready fails, install postgresql if needed, then start the
# Debian cluster that owns the port (pg_ctlcluster); failing that, create and
# start a private cluster in $SECKILL_STATE_DIR/pg (owned by the `postgres` OS
# user when run as root). Finally make sure `psql -h HOST -p PORT -U postgres`
# works without a password (loopback TCP `trust` in pg_hba.conf), because the
# tests and the demo connect as postgres://postgres@HOST:PORT.
#
# Services on a non-loopback host are only checked, never installed/started.
# Works as root (CI, fresh Debian) or as a normal user (apt-get through
# passwordless sudo when available; private clusters owned by that user).

set -euo pipefail

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

log() { printf '%s\n' "$*"; }
die() {
	printf 'deps: error: %s\n' "$*" >&2
	exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# Run a command as root: directly when we are root, else via passwordless sudo.
as_root() {
	if is_root; then
		"$@"
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		sudo -n "$@"
	else
		return 1
	fi
}

can_be_root() {
	is_root || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }
}

# True for addresses that mean "this machine" (we only ever start services
# for those).
is_loopback() {
	case $1 in
	127.* | localhost | ::1) return 0 ;;
	*) return 1 ;;
	esac
}

# Address to bind a service we start ourselves.
bind_addr() {
	if [[ $1 == ::1 ]]; then echo ::1; else echo 127.0.0.1; fi
}

# Is a TCP port open? (bash /dev/tcp, needs no client tools)
tcp_open() {
	# shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
	timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# split_hostport "host:port" DEFAULT_PORT -> sets HP_HOST, HP_PORT.
# Understands "[v6addr]:port" as well.
split_hostport() {
	local hp=$1
	HP_PORT=
	if [[ $hp == \[*\]* ]]; then
		HP_HOST=${hp#\[}
		HP_HOST=${HP_HOST%%\]*}
		HP_PORT=${hp#*\]}
		HP_PORT=${HP_PORT#:}
	else
		HP_HOST=${hp%%:*}
		[[ $hp == *:* ]] && HP_PORT=${hp#*:}
	fi
	HP_HOST=${HP_HOST:-127.0.0.1}
	HP_PORT=${HP_PORT:-$2}
	[[ $HP_PORT =~ ^[0-9]+$ ]] || die "bad port '$HP_PORT' in '$1'"
}

# url_authority URL -> prints "[user[:pass]@]host[:port]" of a scheme://... URL
url_authority() {
	local rest=${1#*://}
	rest=${rest%%/*}
	rest=${rest%%\?*}
	printf '%s\n' "$rest"
}

STATE_DIR=${SECKILL_STATE_DIR:-${HOME:-/tmp}/.local/state/seckill}
case $STATE_DIR in
/*) ;;
*) STATE_DIR=$PWD/$STATE_DIR ;;
esac

APT_UPDATED=0

# apt_install PKG... — noninteractive install, output kept in a log file and
# shown only on failure. `apt-get update` runs once per invocation.
apt_install() {
	command -v apt-get >/dev/null 2>&1 ||
		die "need $* but apt-get is not available; install it by hand"
	can_be_root || die "need root (or passwordless sudo) to apt-get install $*"
	mkdir -p "$STATE_DIR"
	local aptlog=$STATE_DIR/apt.log
	log "deps: installing $* with apt-get (log: $aptlog)"
	# LANG=C.UTF-8 so that a cluster created by the postgresql package is UTF8.
	local env=(env DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8)
	if [[ $APT_UPDATED == 0 ]]; then
		if ! as_root "${env[@]}" apt-get update >>"$aptlog" 2>&1; then
			tail -n 20 "$aptlog" >&2
			die "apt-get update failed"
		fi
		APT_UPDATED=1
	fi
	if ! as_root "${env[@]}" apt-get -o DPkg::Lock::Timeout=120 install -y \
		--no-install-recommends "$@" >>"$aptlog" 2>&1; then
		tail -n 20 "$aptlog" >&2
		die "apt-get install $* failed"
	fi
}

# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------

REDIS_URL=${SECKILL_REDIS_URL:-redis://127.0.0.1:6379}
case $REDIS_URL in
redis://* | rediss://* | valkey://*) ;;
*) die "SECKILL_REDIS_URL must be redis://host[:port][/db], got '$REDIS_URL'" ;;
esac
r_auth=$(url_authority "$REDIS_URL")
r_hostport=${r_auth##*@}
split_hostport "$r_hostport" 6379
R_HOST=$HP_HOST
R_PORT=$HP_PORT
# localhost -> 127.0.0.1, so redis-cli and the server we start agree.
[[ $R_HOST == localhost ]] && R_HOST=127.0.0.1
# A password in the URL (redis://[user]:pass@host) is used for PING.
if [[ $r_auth == *@* ]]; then
	r_userinfo=${r_auth%@*}
	if [[ $r_userinfo == *:* && -n ${r_userinfo#*:} ]]; then
		export REDISCLI_AUTH=${r_userinfo#*:}
	fi
fi

# Prints the server's answer to PING ("PONG"), or nothing when nobody answers.
redis_ping() {
	if command -v redis-cli >/dev/null 2>&1; then
		timeout 5 redis-cli --no-auth-warning -h "$R_HOST" -p "$R_PORT" ping 2>/dev/null || true
	else
		# No client tools yet: speak RESP over /dev/tcp.
		# shellcheck disable=SC2016 # expanded by the inner bash
		timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "PING\r\n" >&3 &&
			IFS= read -r line <&3 && printf "%s\n" "${line#+}"' _ "$R_HOST" "$R_PORT" \
			2>/dev/null | tr -d '\r' || true
	fi
}

ensure_redis() {
	local reply dir i
	reply=$(redis_ping)
	if [[ $reply == PONG ]]; then
		log "redis: up at $R_HOST:$R_PORT (already running)"
		return
	fi
	[[ -z $reply ]] ||
		die "redis: $R_HOST:$R_PORT answered PING with '$reply' (password in SECKILL_REDIS_URL?)"
	is_loopback "$R_HOST" ||
		die "redis: nothing answers at $R_HOST:$R_PORT, and that is not this machine"

	if ! command -v redis-server >/dev/null 2>&1; then
		apt_install redis-server
		# The package may have started its own service (on 6379).
		if [[ $(redis_ping) == PONG ]]; then
			log "redis: up at $R_HOST:$R_PORT (installed and started by the package)"
			return
		fi
	fi

	dir=$STATE_DIR/redis
	mkdir -p "$dir"
	if ! redis-server --daemonize yes --bind "$(bind_addr "$R_HOST")" --port "$R_PORT" \
		--appendonly yes --appendfsync everysec \
		--dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" >/dev/null; then
		tail -n 20 "$dir/redis.log" >&2 2>/dev/null || true
		die "redis: redis-server failed to start (log: $dir/redis.log)"
	fi
	for ((i = 0; i < 50; i++)); do # 10 s
		if [[ $(redis_ping) == PONG ]]; then
			log "redis: up at $R_HOST:$R_PORT (started, data in $dir)"
			return
		fi
		sleep 0.2
	done
	tail -n 20 "$dir/redis.log" >&2 2>/dev/null || true
	die "redis: started redis-server but $R_HOST:$R_PORT did not answer within 10 s (log: $dir/redis.log)"
}

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

PG_HOST_DEFAULT=127.0.0.1
PG_PORT_DEFAULT=5432
if [[ -n ${SECKILL_DATABASE_URL:-} ]]; then
	p_auth=$(url_authority "$SECKILL_DATABASE_URL")
	if [[ -n ${p_auth##*@} ]]; then
		split_hostport "${p_auth##*@}" 5432
		PG_HOST_DEFAULT=$HP_HOST
		PG_PORT_DEFAULT=$HP_PORT
	fi
fi
PG_HOST=${SECKILL_PG_HOST:-$PG_HOST_DEFAULT}
PG_PORT=${SECKILL_PG_PORT:-$PG_PORT_DEFAULT}
[[ $PG_PORT =~ ^[0-9]+$ ]] || die "SECKILL_PG_PORT must be a number, got '$PG_PORT'"

# Server binaries directories, oldest to newest.
pg_bin_dirs() {
	local d
	for d in /usr/lib/postgresql/*/bin; do
		if [[ -x $d/pg_ctl ]]; then printf '%s\n' "$d"; fi
	done | sort -V
}

# pg_isready/psql may live only in /usr/lib/postgresql/VER/bin: put the newest
# such directory at the end of PATH (so Debian's /usr/bin wrappers still win).
add_pg_bin_to_path() {
	local d
	d=$(pg_bin_dirs | tail -n 1)
	if [[ -n $d && :$PATH: != *:$d:* ]]; then
		PATH=$PATH:$d
	fi
}

# Directory holding initdb/pg_ctl (newest version), or nothing.
pg_server_bindir() {
	local d
	d=$(pg_bin_dirs | tail -n 1)
	if [[ -z $d ]] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
		d=$(dirname "$(command -v initdb)")
	fi
	printf '%s\n' "$d"
}

pg_ready() {
	pg_isready -q -t 2 -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1
}

wait_pg_ready() { # $1 = seconds
	local i
	for ((i = 0; i < $1 * 2; i++)); do
		pg_ready && return 0
		sleep 0.5
	done
	return 1
}

# Can we log in over TCP as postgres without a password?
PG_LOGIN_ERR=
pg_login_ok() {
	PG_LOGIN_ERR=$(PGCONNECT_TIMEOUT=5 psql -w -X -h "$PG_HOST" -p "$PG_PORT" -U postgres \
		-d postgres -Atqc 'select 1' 2>&1 >/dev/null) && return 0
	return 1
}

# Run a command as the `postgres` OS user (needed for server files and peer
# authentication on Debian clusters). Without root, run it as ourselves.
as_postgres() {
	if is_root; then
		runuser -u postgres -- "$@"
	elif [[ $(id -un) == postgres ]]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1 && sudo -n -u postgres true 2>/dev/null; then
		sudo -n -u postgres -- "$@"
	else
		"$@"
	fi
}

# Run SQL as superuser over the local Unix socket (peer or trust auth), which
# works even when TCP logins need a password. Prints the result.
pg_local_sql() {
	local sock
	for sock in /var/run/postgresql /tmp; do
		[[ -S $sock/.s.PGSQL.$PG_PORT ]] || continue
		(cd / && as_postgres psql -w -X -h "$sock" -p "$PG_PORT" -U postgres -d postgres \
			-Atqc "$1" 2>/dev/null) && return 0
	done
	return 1
}

# Debian cluster ("ver name status owner") that listens on PG_PORT, if any.
debian_cluster_on_port() {
	command -v pg_lsclusters >/dev/null 2>&1 || return 0
	pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2, $4, $5; exit }'
}

# Try to start the Debian cluster on PG_PORT. Returns 1 if there is none or it
# does not come up.
start_debian_cluster() {
	local line ver name status owner out
	line=$(debian_cluster_on_port)
	[[ -n $line ]] || return 1
	read -r ver name status owner <<<"$line"
	if [[ $status != online ]]; then
		if is_root || [[ $(id -un) == "$owner" ]]; then
			out=$(pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start 2>&1) || true
		else
			out=$(as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start 2>&1) || true
		fi
	fi
	if wait_pg_ready 30; then
		PG_HOW="started cluster $ver/$name"
		return 0
	fi
	printf 'deps: cluster %s/%s did not come up: %s\n' "$ver" "$name" "${out:-}" >&2
	return 1
}

# Create (first time) and start a private cluster in the state directory.
start_private_cluster() {
	local bindir pg_dir pg_log listen home
	bindir=$(pg_server_bindir)
	[[ -n $bindir ]] || die "postgres: no initdb/pg_ctl found (looked in /usr/lib/postgresql/*/bin and PATH)"

	mkdir -p "$STATE_DIR"
	pg_dir=$STATE_DIR/pg
	pg_log=$STATE_DIR/pg.log
	if is_root; then
		id postgres >/dev/null 2>&1 || die "postgres: running as root but there is no 'postgres' OS user"
		# The server runs as postgres, so it must be able to reach the state
		# directory; root's home usually is mode 700. Then keep the cluster
		# in postgres's home instead.
		if ! runuser -u postgres -- test -x "$STATE_DIR"; then
			home=$(getent passwd postgres | cut -d: -f6)
			pg_dir=$home/seckill/pg-$PG_PORT
			pg_log=$home/seckill/pg-$PG_PORT.log
			runuser -u postgres -- mkdir -p "$home/seckill"
		fi
		mkdir -p "$pg_dir"
		touch "$pg_log"
		chown postgres: "$pg_dir" "$pg_log"
	else
		mkdir -p "$pg_dir"
		touch "$pg_log"
	fi
	chmod 700 "$pg_dir"

	# Use the binaries of the version the cluster was created with.
	if [[ -f $pg_dir/PG_VERSION && -x /usr/lib/postgresql/$(cat "$pg_dir/PG_VERSION")/bin/pg_ctl ]]; then
		bindir=/usr/lib/postgresql/$(cat "$pg_dir/PG_VERSION")/bin
	fi

	if [[ ! -f $pg_dir/PG_VERSION ]]; then
		if ! (cd / && as_postgres "$bindir/initdb" -D "$pg_dir" -U postgres --auth=trust \
			--encoding=UTF8 --locale=C) >>"$pg_log" 2>&1; then
			tail -n 20 "$pg_log" >&2
			die "postgres: initdb -D $pg_dir failed (log: $pg_log)"
		fi
	fi

	listen=$(bind_addr "$PG_HOST")
	if ! (cd / && as_postgres "$bindir/pg_ctl" -D "$pg_dir" -w -t 30 -l "$pg_log" \
		-o "-p $PG_PORT -k /tmp -c listen_addresses=$listen" start) >/dev/null 2>&1; then
		tail -n 20 "$pg_log" >&2
		die "postgres: pg_ctl -D $pg_dir start failed (log: $pg_log)"
	fi
	wait_pg_ready 30 || die "postgres: private cluster did not answer within 30 s (log: $pg_log)"
	PG_HOW="started private cluster in $pg_dir"
}

# Loopback TCP logins as postgres must not need a password: if they do, put
# `trust` lines for 127.0.0.1/::1 at the top of pg_hba.conf and reload.
ensure_trust_login() {
	local hba tmp i marker='# seckill scripts/deps.sh: passwordless loopback TCP logins'
	pg_login_ok && return 0
	is_loopback "$PG_HOST" ||
		die "postgres: cannot log in to $PG_HOST:$PG_PORT as postgres without a password: $PG_LOGIN_ERR"
	hba=$(pg_local_sql 'show hba_file') || hba=
	[[ -n $hba ]] ||
		die "postgres: cannot log in as postgres over TCP ($PG_LOGIN_ERR), and cannot reach the server over its Unix socket to fix pg_hba.conf"
	if ! grep -qF "$marker" "$hba" 2>/dev/null; then
		[[ -w $hba ]] || die "postgres: need write access to $hba to allow passwordless loopback logins"
		tmp=$(mktemp)
		{
			printf '%s\n' "$marker" \
				'host    all    all    127.0.0.1/32    trust' \
				'host    all    all    ::1/128         trust' ''
			cat "$hba"
		} >"$tmp"
		cat "$tmp" >"$hba" # keeps the file's owner and mode
		rm -f "$tmp"
		pg_local_sql 'select pg_reload_conf()' >/dev/null || true
		log "postgres: allowed passwordless loopback TCP logins (trust) in $hba"
	fi
	for ((i = 0; i < 10; i++)); do
		pg_login_ok && return 0
		sleep 0.5
	done
	die "postgres: still cannot log in to $PG_HOST:$PG_PORT as postgres: $PG_LOGIN_ERR"
}

ensure_postgres() {
	PG_HOW="already running"
	add_pg_bin_to_path

	# Client tools first. If something already listens there, the client is
	# all we need; otherwise install the server (it brings the client).
	if ! command -v pg_isready >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
		if is_loopback "$PG_HOST" && ! tcp_open "$PG_HOST" "$PG_PORT"; then
			apt_install postgresql
		else
			apt_install postgresql-client
		fi
		add_pg_bin_to_path
	fi

	if ! pg_ready; then
		is_loopback "$PG_HOST" ||
			die "postgres: nothing answers at $PG_HOST:$PG_PORT, and that is not this machine"
		if [[ -z $(pg_server_bindir) ]]; then
			# Installing creates (and may start) the cluster main.
			apt_install postgresql
			add_pg_bin_to_path
		fi
		if pg_ready; then
			PG_HOW="installed and started by the package"
		elif ! start_debian_cluster; then
			start_private_cluster
		fi
	fi

	ensure_trust_login
	log "postgres: up at $PG_HOST:$PG_PORT ($PG_HOW)"
}

ensure_redis
ensure_postgres
