#!/usr/bin/env bash
# scripts/ensure-test-packages.sh — make sure the system packages the tests
# use are installed: nginx and its Lua module for tests/it/nginx.rs (which
# runs nginx with its own prefix and ports), libfaketime for the test of
# gateways with skewed clocks (tests/it/races.rs), headless Chromium with its
# WebDriver for the browser tests (tests/it/browser.rs), and the
# `redis-server` and `redis-cli` binaries the Redis Cluster tests start their
# nodes with (tests/it/cluster_procs.rs), even when the shared Redis runs
# elsewhere.
#
# Idempotent and quiet: when they are present it prints nothing and exits 0.
# Otherwise it installs the missing Debian packages (`nginx`,
# `libnginx-mod-http-lua`, `libfaketime`, `chromium`, `chromium-driver`,
# `redis-server`, `redis-tools`) with apt-get (noninteractive,
# `apt-get update` once, output in $SECKILL_STATE_DIR/apt.log, shown only on
# failure).
#
# It never leaves the system nginx service running: during the install a
# policy-rc.d forbids services from starting, and if the package started
# nginx anyway it is stopped again, so port 80 stays free. The tests do not
# need that service: each one starts its own nginx on a spare port.
#
# Works as root (CI) or as a normal user with passwordless sudo.

set -euo pipefail

NGINX=/usr/sbin/nginx
LUA_MODULE=/usr/lib/nginx/modules/ngx_http_lua_module.so
NDK_MODULE=/usr/lib/nginx/modules/ndk_http_module.so
CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

packages=()
[[ -x $NGINX && -f $LUA_MODULE && -f $NDK_MODULE ]] || packages+=(nginx libnginx-mod-http-lua)
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || packages+=(libfaketime)
[[ -x $CHROMIUM && -x $CHROMEDRIVER ]] || packages+=(chromium chromium-driver)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || packages+=(redis-tools)
if ((${#packages[@]} == 0)); then
	exit 0
fi

die() {
	printf 'ensure-test-packages: error: %s\n' "$*" >&2
	exit 1
}

as_root() {
	if [[ $(id -u) -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		sudo -n "$@"
	else
		die "need root (or passwordless sudo) to run: $*"
	fi
}

command -v apt-get >/dev/null 2>&1 ||
	die "${packages[*]} missing and apt-get is not available; install them by hand"

state_dir=${SECKILL_STATE_DIR:-${HOME:-/tmp}/.local/state/seckill}
mkdir -p "$state_dir"
aptlog=$state_dir/apt.log

# Was a system nginx already running before we touched anything? Then it is
# somebody else's and we leave it alone.
was_running=false
if [[ -f /run/nginx.pid ]] && kill -0 "$(cat /run/nginx.pid 2>/dev/null)" 2>/dev/null; then
	was_running=true
fi

# Forbid maintainer scripts from starting services (the Debian convention for
# containers and build machines), unless a policy is already in place.
policy=/usr/sbin/policy-rc.d
own_policy=false
if [[ ! -e $policy ]]; then
	as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
	own_policy=true
fi
cleanup() {
	if $own_policy; then
		as_root rm -f "$policy" || true
	fi
}
trap cleanup EXIT

printf 'ensure-test-packages: installing %s with apt-get (log: %s)\n' "${packages[*]}" "$aptlog"
env=(env DEBIAN_FRONTEND=noninteractive)
if ! as_root "${env[@]}" apt-get update >>"$aptlog" 2>&1; then
	tail -n 20 "$aptlog" >&2
	die "apt-get update failed"
fi
if ! as_root "${env[@]}" apt-get -o DPkg::Lock::Timeout=120 install -y \
	--no-install-recommends "${packages[@]}" >>"$aptlog" 2>&1; then
	tail -n 20 "$aptlog" >&2
	die "apt-get install ${packages[*]} failed"
fi

# If the package started the system service anyway, stop it: port 80 stays
# free and nothing runs that the tests did not start themselves.
if ! $was_running && [[ -f /run/nginx.pid ]] &&
	kill -0 "$(cat /run/nginx.pid 2>/dev/null)" 2>/dev/null; then
	as_root "$NGINX" -s stop >/dev/null 2>&1 ||
		as_root service nginx stop >/dev/null 2>&1 || true
fi

[[ -x $NGINX ]] || die "$NGINX is still missing after the install"
[[ -f $LUA_MODULE && -f $NDK_MODULE ]] ||
	die "the Lua module ($LUA_MODULE, $NDK_MODULE) is still missing after the install"
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null ||
	die "libfaketime is still missing after the install"
[[ -x $CHROMIUM && -x $CHROMEDRIVER ]] ||
	die "chromium or chromium-driver is still missing after the install"
printf 'ensure-test-packages: %s, libfaketime, %s\n' "$("$NGINX" -v 2>&1)" "$("$CHROMEDRIVER" --version 2>/dev/null | head -n 1)"
