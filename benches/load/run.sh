#!/usr/bin/env bash
# Load benchmark for convocore-gateway (issue 7): the gateway against the bare upstream it
# fronts and against nginx doing the same job. See benches/load/README.md.
#
# Everything runs on 127.0.0.1: the bare upstream (examples/bare_upstream.rs), the gateway in
# front of it, and one nginx (a caching proxy and a pass-through). wrk is pinned to one core,
# every server to the other, one worker/thread each. Each target is warmed, then the targets are
# measured in alternation over several rounds, and the medians and ratios are printed.
#
#   bash benches/load/run.sh              # full run: 5 rounds x 10 s per target, 32 connections
#   bash benches/load/run.sh --quick      # smoke run: 1 round x 1 s
#   bash benches/load/run.sh --memory     # resident memory with max_bytes = 64MiB, 1 MiB exports
#   bash benches/load/run.sh --memory-small   # resident memory per cached 2 KiB export, 32MiB
#   bash benches/load/run.sh --encodings      # hits in zstd/br/gzip vs identity (and nginx gzip)
set -euo pipefail

usage() {
    cat <<'EOF'
usage: benches/load/run.sh [options]

  --quick            smoke run: 1 round, 1 s warm-up and 1 s per measurement
  --rounds N         measurement rounds (default 5; --quick: 1)
  --duration S       seconds per measurement (default 10; --quick: 1)
  --warmup S         seconds of warm-up per target (default 3; --quick: 1)
  --connections LIST wrk connections, e.g. 32 or 8,32 (default 32; one table per value)
  --memory           memory check instead: max_bytes = 64MiB filled with distinct 1 MiB exports
  --memory-exports N distinct exports per fill pass in --memory (default 100; two passes)
  --memory-small     memory check with small exports: max_bytes = 32MiB, two passes of 16,000
                     distinct 2 KiB exports (past the bound), then RSS per entry vs cache_bytes
  --encodings        compression instead: gateway hits of one entry in identity, zstd, br and
                     gzip (each encoding made once, then kept), nginx hits plain and gzipped
  --body-bytes N     export size served by the bare upstream (default 2048)
  --keep             keep the temp dir (configs, logs, raw wrk output) and print its path
  -h, --help         this text

Environment: BENCH_CLIENT_CORE (default 0) and BENCH_SERVER_CORE (default 1) choose the cores;
CARGO_TARGET_DIR is honoured.
EOF
}

# ---------------------------------------------------------------------------------- options
ROUNDS="" DURATION="" WARMUP="" CONNECTIONS="32" QUICK=0 MEMORY=0 KEEP=0 MEM_EXPORTS=100
MEMORY_SMALL=0 ENCODINGS=0 BODY_BYTES=2048
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS="${2:?--rounds needs a value}"; shift ;;
        --duration) DURATION="${2:?--duration needs a value}"; shift ;;
        --warmup) WARMUP="${2:?--warmup needs a value}"; shift ;;
        --connections) CONNECTIONS="${2:?--connections needs a value}"; shift ;;
        --memory) MEMORY=1 ;;
        --memory-small) MEMORY_SMALL=1 ;;
        --encodings) ENCODINGS=1 ;;
        --body-bytes) BODY_BYTES="${2:?--body-bytes needs a value}"; shift ;;
        --memory-exports) MEM_EXPORTS="${2:?--memory-exports needs a value}"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [[ $QUICK == 1 ]]; then
    ROUNDS="${ROUNDS:-1}" DURATION="${DURATION:-1}" WARMUP="${WARMUP:-1}"
else
    ROUNDS="${ROUNDS:-5}" DURATION="${DURATION:-10}" WARMUP="${WARMUP:-3}"
fi
for v in "$ROUNDS" "$DURATION" "$WARMUP" "$MEM_EXPORTS" "$BODY_BYTES"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: not a positive integer: $v" >&2; exit 2; }
done
[[ "$CONNECTIONS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] \
    || { echo "run.sh: --connections takes N or N,M,...: $CONNECTIONS" >&2; exit 2; }
(( ROUNDS <= 100 && DURATION <= 600 && WARMUP <= 600 && MEM_EXPORTS <= 10000 \
    && BODY_BYTES <= 64 * 1024 * 1024 )) \
    || { echo "run.sh: rounds <= 100, duration/warmup <= 600 s, memory-exports <= 10000," \
        "body-bytes <= 64 MiB" >&2; exit 2; }
IFS=, read -r -a CONN_LIST <<<"$CONNECTIONS"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
FIXTURES="$ROOT/tests/fixtures"
CLIENT_CORE="${BENCH_CLIENT_CORE:-0}"
SERVER_CORE="${BENCH_SERVER_CORE:-1}"
AGENT="agent-bench"
CONVO="convo-bench"
EXPORT_PATH="/v3/agents/$AGENT/convos/$CONVO/export?format=json"
UPSTREAM_TOKEN="bench-convocore-token-0123456789"

say() { printf '%s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------- requirements
NGINX_BIN="$(command -v nginx || true)"
[[ -z "$NGINX_BIN" && -x /usr/sbin/nginx ]] && NGINX_BIN=/usr/sbin/nginx
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[[ -n "$NGINX_BIN" ]] || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]} (Debian packages)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y "${missing[@]}" >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; } \
            || die "could not install: ${missing[*]}"
        NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)"
    else
        say "run.sh needs: ${missing[*]}. Install them with:"
        say "    sudo apt-get install -y ${missing[*]}"
        exit 1
    fi
fi
command -v cargo >/dev/null || die "needs cargo (a Rust toolchain, 1.88 or newer)"
NCPU="$(nproc)"
if (( NCPU < 2 )); then
    say "WARNING: only $NCPU core: wrk and the servers share it; numbers are not comparable"
    CLIENT_CORE=0 SERVER_CORE=0
fi

# ----------------------------------------------------------------------------------- build
say "building (cargo build --release; --example bare_upstream) ..."
(cd "$ROOT" && cargo build --release --quiet && cargo build --release --quiet --example bare_upstream) \
    || die "build failed"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
GATEWAY="$TARGET_DIR/release/convocore-gateway"
BARE="$TARGET_DIR/release/examples/bare_upstream"
[[ -x "$GATEWAY" && -x "$BARE" ]] || die "built binaries not found under $TARGET_DIR/release"

# --------------------------------------------------------------------- temp dir and cleanup
TMP="$(mktemp -d "${TMPDIR:-/tmp}/convocore-load.XXXXXX")"
PIDS=()          # every process this script started, in start order
NGINX_PID=""
NGINX_WORKERS=()

alive() {  # a live (not zombie) process
    local st
    [[ -r "/proc/$1/stat" ]] || return 1
    st="$(sed -e 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n "$st" && "$st" != Z ]]
}

stop_pid() {  # TERM, up to 5 s, then KILL; only ever a PID this script started
    local pid=$1 i
    alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid i
    set +e
    trap - EXIT INT TERM
    # nginx's master first (a killed worker would be respawned), then any worker left over.
    [[ -n "$NGINX_PID" ]] && stop_pid "$NGINX_PID"
    for pid in "${NGINX_WORKERS[@]}"; do
        # Only if that PID is still one of nginx's (a PID can be reused once it exited).
        alive "$pid" && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == nginx ]] \
            && kill -KILL "$pid" 2>/dev/null
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    if [[ $KEEP == 1 ]]; then
        say "kept: $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------------------------------- helpers
render() {  # render TEMPLATE OUT KEY=VALUE...: replace every @KEY@
    local in=$1 out=$2 kv k v
    shift 2
    local args=()
    for kv in "$@"; do
        k=${kv%%=*}
        v=$(printf '%s' "${kv#*=}" | sed -e 's/[\\|&]/\\&/g')
        args+=(-e "s|@${k}@|${v}|g")
    done
    sed "${args[@]}" "$in" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then die "unfilled placeholder in $out"; fi
}

free_ports() {  # N free loopback ports
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_ready() {  # wait_ready URL PID NAME LOG: until URL answers 200 (10 s at most)
    local url=$1 pid=$2 name=$3 log=$4 i code
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || { tail -n 20 "$log" >&2; die "$name exited at startup (log above)"; }
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)"
        [[ "$code" == 200 ]] && return 0
        sleep 0.1
    done
    tail -n 20 "$log" >&2
    die "$name not ready after 10 s ($url)"
}

children() {  # direct children of a PID
    local f="/proc/$1/task/$1/children"
    if [[ -r "$f" ]]; then
        cat "$f"
    else
        awk -v pp="$1" '{ line = $0; sub(/.*\) /, "", line); split(line, a, " ");
            if (a[2] == pp) { n = split(FILENAME, p, "/"); print p[3] } }' /proc/[0-9]*/stat 2>/dev/null
    fi
}

cpu_ticks() {  # utime + stime (clock ticks) summed over the given PIDs
    local pid sum=0 t
    for pid in "$@"; do
        # Fields 14 and 15 of /proc/PID/stat, counted after the ")" that ends the command name.
        t="$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null)" || t=0
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}
CLK_TCK="$(getconf CLK_TCK)"

mint_jwt() {  # an RS256 team JWT signed with the fixture key rsa-1
    local py=python3
    if ! python3 -c 'import jwt, cryptography' 2>/dev/null; then
        say "  PyJWT not found: installing pyjwt and cryptography into a venv under $TMP" >&2
        python3 -m venv "$TMP/venv" >/dev/null \
            && "$TMP/venv/bin/pip" install -q pyjwt cryptography >/dev/null \
            || die "could not install PyJWT (pip install pyjwt cryptography)"
        py="$TMP/venv/bin/python"
    fi
    "$py" - "$FIXTURES/rsa_private.pem" <<'EOF'
import sys, time
import jwt
now = int(time.time())
claims = {
    "iss": "https://idp.example.internal",
    "aud": "convocore-gateway",
    "sub": "bench-load",
    "team": "bench",
    "iat": now,
    "nbf": now - 60,
    "exp": 4102444800,
}
with open(sys.argv[1]) as f:
    key = f.read()
print(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "rsa-1"}))
EOF
}

# ------------------------------------------------------------------------ the processes
UP_PID="" GW_PID=""
read -r P_UP P_GW P_GWADM P_NGC P_NGP <<<"$(free_ports 5)"
printf '%s' "$UPSTREAM_TOKEN" >"$TMP/convocore-token"

start_upstream() {  # start_upstream BODY_BYTES [PIN]
    local pin=(taskset -c "$SERVER_CORE")
    [[ "${2:-pin}" == nopin ]] && pin=()
    "${pin[@]}" "$BARE" --listen "127.0.0.1:$P_UP" --threads 1 --body-bytes "$1" \
        >"$TMP/upstream.log" 2>&1 &
    UP_PID=$!
    PIDS+=("$UP_PID")
    wait_ready "http://127.0.0.1:$P_UP/" "$UP_PID" "bare upstream" "$TMP/upstream.log"
    say "  bare upstream: pid $UP_PID on 127.0.0.1:$P_UP, $1-byte body, 1 thread${pin:+, core $SERVER_CORE}"
}

start_gateway() {  # start_gateway MAX_BYTES [PIN]
    render "$HERE/gateway.toml.in" "$TMP/gateway.toml" \
        LISTEN_PORT="$P_GW" ADMIN_PORT="$P_GWADM" UPSTREAM_PORT="$P_UP" \
        TOKEN_FILE="$TMP/convocore-token" PUBLIC_KEY_FILE="$FIXTURES/rsa_public.pem" \
        AGENT="$AGENT" MAX_BYTES="$1"
    local out
    if ! out="$("$GATEWAY" check-config --config "$TMP/gateway.toml" 2>&1)"; then
        printf '%s\n' "$out" | sed -e 's/^/    | /' >&2
        die "gateway check-config failed for $TMP/gateway.toml"
    fi
    say "  gateway check-config: ok"
    printf '%s\n' "$out" | sed -e 's/^/    | /'
    if [[ "${2:-pin}" == nopin ]]; then
        "$GATEWAY" --config "$TMP/gateway.toml" \
            >"$TMP/gateway-access.log" 2>"$TMP/gateway.stderr" &
    else
        # The gateway has no thread flag; tokio's multi-thread builder reads TOKIO_WORKER_THREADS.
        TOKIO_WORKER_THREADS=1 taskset -c "$SERVER_CORE" "$GATEWAY" --config "$TMP/gateway.toml" \
            >"$TMP/gateway-access.log" 2>"$TMP/gateway.stderr" &
    fi
    GW_PID=$!
    PIDS+=("$GW_PID")
    wait_ready "http://127.0.0.1:$P_GWADM/readyz" "$GW_PID" gateway "$TMP/gateway.stderr"
    local threads
    threads="$(awk '/^Threads:/ { print $2 }' "/proc/$GW_PID/status")"
    if [[ "${2:-pin}" == nopin ]]; then
        say "  gateway: pid $GW_PID on 127.0.0.1:$P_GW (admin $P_GWADM), default worker threads," \
            "$threads OS threads, max_bytes $1, access log -> file"
    else
        say "  gateway: pid $GW_PID on 127.0.0.1:$P_GW (admin $P_GWADM), TOKIO_WORKER_THREADS=1," \
            "core $SERVER_CORE, $threads OS threads, max_bytes $1, JSON access log -> file"
    fi
}

start_nginx() {
    local prefix="$TMP/nginx" user_line="" eflag=()
    mkdir -p "$prefix"/{cache,client_body,proxy_temp,fastcgi_temp,uwsgi_temp,scgi_temp}
    # As root the master would start its worker as `nobody`; keep the invoking user instead.
    [[ $(id -u) == 0 ]] && user_line="user $(id -un);"
    render "$HERE/nginx.conf.in" "$prefix/nginx.conf" \
        PREFIX="$prefix" USER_LINE="$user_line" UPSTREAM_PORT="$P_UP" \
        CACHE_PORT="$P_NGC" PASS_PORT="$P_NGP" UPSTREAM_TOKEN="$UPSTREAM_TOKEN"
    # -e (nginx >= 1.19.5) keeps the startup error log out of /var/log/nginx.
    "$NGINX_BIN" -h 2>&1 | grep -q -- '-e filename' && eflag=(-e "$prefix/error.log")
    "$NGINX_BIN" -t -q -p "$prefix/" -c "$prefix/nginx.conf" "${eflag[@]}" \
        || die "nginx -t failed for $prefix/nginx.conf"
    taskset -c "$SERVER_CORE" "$NGINX_BIN" -p "$prefix/" -c "$prefix/nginx.conf" "${eflag[@]}" \
        >"$prefix/stdout.log" 2>&1 &
    NGINX_PID=$!
    wait_ready "http://127.0.0.1:$P_NGP/" "$NGINX_PID" nginx "$prefix/error.log"
    read -r -a NGINX_WORKERS <<<"$(children "$NGINX_PID" | tr '\n' ' ')"
    [[ ${#NGINX_WORKERS[@]} -ge 1 ]] || die "nginx has no worker process"
    say "  nginx $("$NGINX_BIN" -v 2>&1 | sed -e 's/.*nginx\///'): master $NGINX_PID," \
        "children ${NGINX_WORKERS[*]} (worker, cache manager, cache loader), cache on 127.0.0.1:$P_NGC, pass-through on" \
        "127.0.0.1:$P_NGP, core $SERVER_CORE"
}

# ------------------------------------------------------------------------------ --memory
if [[ $MEMORY == 1 ]]; then
    MIB=$((1024 * 1024))
    say "memory check: gateway with max_bytes = 64MiB, bare upstream serving 1 MiB exports"
    start_upstream "$MIB" nopin
    start_gateway "64MiB" nopin
    JWT="$(mint_jwt)"
    rss_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
    metric() {
        curl -s --max-time 5 "http://127.0.0.1:$P_GWADM/metrics" \
            | awk -v m="$1" '$1 == m { printf "%.0f", $2 }'
    }
    say "  gateway VmRSS at start: $(( $(rss_kib "$GW_PID" VmRSS) / 1024 )) MiB"
    failures=0
    for pass in 1 2; do
        for ((i = 1; i <= MEM_EXPORTS; i++)); do
            out="$(curl -s -o /dev/null -w '%{http_code} %{size_download}' --max-time 30 \
                -H "Authorization: Bearer $JWT" \
                "http://127.0.0.1:$P_GW/v3/agents/$AGENT/convos/mem-$pass-$i/export?format=json" \
                || true)"
            [[ "$out" == "200 $MIB" ]] || failures=$((failures + 1))
        done
        sleep 1
        entries="$(metric convocore_gateway_cache_entries)"
        cbytes="$(metric convocore_gateway_cache_bytes)"
        last="$(curl -s -o /dev/null -D - --max-time 30 -H "Authorization: Bearer $JWT" \
            "http://127.0.0.1:$P_GW/v3/agents/$AGENT/convos/mem-$pass-$MEM_EXPORTS/export?format=json" \
            | awk -F': ' 'tolower($1) == "x-cache" { gsub(/\r/, "", $2); print $2 }')"
        say "  after pass $pass ($((pass * MEM_EXPORTS)) distinct 1 MiB exports):" \
            "VmRSS $(( $(rss_kib "$GW_PID" VmRSS) / 1024 )) MiB, VmHWM $(( $(rss_kib "$GW_PID" VmHWM) / 1024 )) MiB," \
            "cache_entries ${entries:-?}," \
            "cache_bytes $(( ${cbytes:-0} / MIB )) MiB," \
            "last export again: X-Cache ${last:-?}"
    done
    (( failures == 0 )) || say "  WARNING: $failures fill requests did not return 200 with 1 MiB"
    rss=$(rss_kib "$GW_PID" VmRSS)
    limit_kib=$(( (115 * 64 * 1024) / 100 + 40 * 1024 ))
    verdict=FAIL
    (( rss <= limit_kib )) && verdict=PASS
    threads="$(awk '/^Threads:/ { print $2 }' "/proc/$GW_PID/status")"
    say ""
    say "memory: gateway VmRSS $(awk -v k="$rss" 'BEGIN { printf "%.1f", k / 1024 }') MiB" \
        "vs target 1.15 x 64 MiB + 40 MiB = $(awk -v k="$limit_kib" 'BEGIN { printf "%.1f", k / 1024 }') MiB" \
        "($threads OS threads)  $verdict"
    exit 0
fi

# ------------------------------------------------------------------------ --memory-small
if [[ $MEMORY_SMALL == 1 ]]; then
    MIB=$((1024 * 1024)) SMALL=2048 PASS_EXPORTS=16000
    say "memory check, small exports: gateway with max_bytes = 32MiB, bare upstream serving 2 KiB exports"
    start_upstream "$SMALL" nopin
    start_gateway "32MiB" nopin
    JWT="$(mint_jwt)"
    rss_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
    metric() {
        curl -s --max-time 5 "http://127.0.0.1:$P_GWADM/metrics" \
            | awk -v m="$1" '$1 == m { printf "%.0f", $2 }'
    }
    start_kib=$(rss_kib "$GW_PID" VmRSS)
    say "  gateway VmRSS at start: $(( start_kib / 1024 )) MiB"
    failures=0
    for pass in 1 2; do
        # One curl, one keep-alive connection, a URL glob: 16,000 requests in a few seconds.
        curl -s --max-time 600 -H "Authorization: Bearer $JWT" \
            -w '%{stderr}%{http_code} %{size_download}\n' \
            "http://127.0.0.1:$P_GW/v3/agents/$AGENT/convos/small-$pass-[1-$PASS_EXPORTS]/export?format=json" \
            >/dev/null 2>"$TMP/small-$pass.codes" || true
        bad=$(grep -cv "^200 $SMALL\$" "$TMP/small-$pass.codes" || true)
        failures=$((failures + bad))
        sleep 2
        entries="$(metric convocore_gateway_cache_entries)"
        cbytes="$(metric convocore_gateway_cache_bytes)"
        rss=$(rss_kib "$GW_PID" VmRSS)
        grown=$(( (rss - start_kib) * 1024 ))
        per_entry=$(( entries > 0 ? grown / entries : 0 ))
        weight=$(( entries > 0 ? ${cbytes:-0} / entries : 0 ))
        say "  after pass $pass ($((pass * PASS_EXPORTS)) distinct 2 KiB exports):" \
            "VmRSS $(( rss / 1024 )) MiB (+$(( grown / MIB )) MiB), cache_entries ${entries:-?}," \
            "cache_bytes $(( ${cbytes:-0} / MIB )) MiB; per entry: RSS $per_entry B, weight $weight B"
    done
    (( failures == 0 )) || say "  WARNING: $failures fill requests did not return 200 with 2 KiB"
    limit=$(( 32 * MIB * 125 / 100 ))
    verdict=FAIL
    (( grown <= limit )) && verdict=PASS
    say ""
    say "memory-small: VmRSS grew $(awk -v b="$grown" 'BEGIN { printf "%.1f", b / 1048576 }') MiB" \
        "for a 32 MiB bound (target <= 1.25 x 32 MiB = 40 MiB)  $verdict"
    exit 0
fi

# ------------------------------------------------------------------------------- the run
say "starting servers on 127.0.0.1 (servers on core $SERVER_CORE, wrk on core $CLIENT_CORE):"
start_upstream "$BODY_BYTES"
start_gateway "256MiB"
start_nginx
JWT="$(mint_jwt)"
AUTH="Authorization: Bearer $JWT"

TARGETS=(gw_hit gw_miss nginx_hit nginx_pass bare)
[[ $ENCODINGS == 1 ]] && TARGETS=(gw_hit gw_zstd gw_br gw_gzip nginx_hit nginx_gzip)
declare -A LABEL=(
    [gw_hit]="gateway hit" [gw_miss]="gateway miss (no-store)" [nginx_hit]="nginx hit"
    [nginx_pass]="nginx pass-through" [bare]="bare upstream"
    [gw_zstd]="gateway hit, zstd" [gw_br]="gateway hit, br" [gw_gzip]="gateway hit, gzip"
    [nginx_gzip]="nginx hit, gzip"
)
declare -A CODING=([gw_zstd]=zstd [gw_br]=br [gw_gzip]=gzip [nginx_gzip]=gzip)
target_url() {
    case "$1" in
        gw_*) echo "http://127.0.0.1:$P_GW$EXPORT_PATH" ;;
        nginx_pass) echo "http://127.0.0.1:$P_NGP$EXPORT_PATH" ;;
        nginx_*) echo "http://127.0.0.1:$P_NGC$EXPORT_PATH" ;;
        bare) echo "http://127.0.0.1:$P_UP$EXPORT_PATH" ;;
    esac
}
target_headers() {  # extra request headers, one per line
    [[ "$1" == gw_miss ]] && echo "Cache-Control: no-store"
    [[ -n "${CODING[$1]:-}" ]] && echo "Accept-Encoding: ${CODING[$1]}"
    return 0
}
server_pids() {  # the server under test
    case "$1" in
        gw_*) echo "$GW_PID" ;;
        nginx_*) echo "$NGINX_PID" $(children "$NGINX_PID") ;;
        bare) echo "$UP_PID" ;;
    esac
}
upstream_pids() {  # the bare upstream behind it, counted apart
    case "$1" in
        bare) ;;
        *) echo "$UP_PID" ;;
    esac
}

# Check every target once: status, body length, and the cache outcome it is meant to measure.
header_of() { awk -F': ' -v h="$1" 'tolower($1) == h { gsub(/\r/, "", $2); print $2 }'; }
say "checking the targets:"
GW_SENT=0
declare -A ENCODED_SIZE=()
for t in "${TARGETS[@]}"; do
    url="$(target_url "$t")"
    hdrs=(-H "$AUTH")
    while IFS= read -r h; do [[ -n "$h" ]] && hdrs+=(-H "$h"); done < <(target_headers "$t")
    curl -s -o /dev/null --max-time 5 "${hdrs[@]}" "$url" >/dev/null || true   # prime the caches
    resp="$(curl -s -D - -o "$TMP/body.$t" --max-time 5 "${hdrs[@]}" "$url" || true)"
    [[ $t == gw_* ]] && GW_SENT=$((GW_SENT + 2))
    status="$(head -n 1 <<<"$resp" | awk '{ print $2 }')"
    size="$(wc -c <"$TMP/body.$t" 2>/dev/null || echo 0)"
    outcome="-"
    case "$t" in
        gw_*) outcome="X-Cache: $(header_of x-cache <<<"$resp")" ;;
        nginx_*) outcome="X-Cache-Status: $(header_of x-cache-status <<<"$resp")" ;;
    esac
    encoding="$(header_of content-encoding <<<"$resp")"
    say "  $(printf '%-24s' "${LABEL[$t]}") $status, $size bytes, $outcome${encoding:+, Content-Encoding: $encoding}"
    if [[ -n "${CODING[$t]:-}" ]]; then
        [[ "$status" == 200 && "$encoding" == "${CODING[$t]}" && "$size" -lt "$BODY_BYTES" ]] \
            || die "${LABEL[$t]}: expected 200 in ${CODING[$t]}, smaller than $BODY_BYTES bytes"
        ENCODED_SIZE[$t]=$size
    else
        [[ "$status" == 200 && "$size" == "$BODY_BYTES" ]] || die "${LABEL[$t]}: expected 200 and $BODY_BYTES bytes"
    fi
    case "$t" in
        gw_hit|gw_zstd|gw_br|gw_gzip) [[ "$outcome" == "X-Cache: HIT" ]] || die "${LABEL[$t]} target is not a HIT" ;;
        nginx_gzip) [[ "$outcome" == "X-Cache-Status: HIT" ]] || die "nginx gzip target is not a HIT" ;;
        gw_miss) [[ "$outcome" == "X-Cache: BYPASS" ]] || die "gateway miss target is not a BYPASS" ;;
        nginx_hit) [[ "$outcome" == "X-Cache-Status: HIT" ]] || die "nginx hit target is not a HIT" ;;
    esac
done

# One wrk run: prints "rps p50_us p99_us requests cpu_us_per_req upstream_cpu_us_per_req non2xx errors"
run_wrk() {  # run_wrk TARGET CONNS SECONDS OUTFILE
    local t=$1 c=$2 d=$3 out=$4 url cpu0 cpu1 up0 up1 hdrs=(-H "$AUTH") h spids upids
    url="$(target_url "$t")"
    while IFS= read -r h; do [[ -n "$h" ]] && hdrs+=(-H "$h"); done < <(target_headers "$t")
    read -r -a spids <<<"$(server_pids "$t")"
    read -r -a upids <<<"$(upstream_pids "$t")"
    cpu0=$(cpu_ticks "${spids[@]}")
    up0=$(cpu_ticks "${upids[@]}")
    taskset -c "$CLIENT_CORE" wrk -t1 -c"$c" -d"${d}s" --latency "${hdrs[@]}" "$url" >"$out" 2>&1 \
        || { cat "$out" >&2; die "wrk failed against ${LABEL[$t]}"; }
    cpu1=$(cpu_ticks "${spids[@]}")
    up1=$(cpu_ticks "${upids[@]}")
    awk -v cpu=$((cpu1 - cpu0)) -v up=$((up1 - up0)) -v hz="$CLK_TCK" '
        function us(v) {  # wrk latency ("262.00us", "1.02ms", "1.20s", "2.00m") -> microseconds
            if (v ~ /us$/) return v + 0
            if (v ~ /ms$/) return (v + 0) * 1000
            if (v ~ /m$/) return (v + 0) * 60e6
            if (v ~ /s$/) return (v + 0) * 1e6
            return v + 0
        }
        $1 == "50%" { p50 = us($2) }
        $1 == "99%" { p99 = us($2) }
        / requests in / { req = $1 }
        $1 == "Requests/sec:" { rps = $2 }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ { gsub(/,/, ""); errs = $4 + $6 + $8 + $10 }
        END {
            if (req <= 0) { print "0 0 0 0 0 0 0 0"; exit }
            printf "%.1f %.1f %.1f %d %.2f %.2f %d %d\n", rps, p50, p99, req,
                cpu * 1e6 / hz / req, up * 1e6 / hz / req, non2xx + 0, errs + 0
        }' "$out"
}

median() {  # median of the numbers on stdin
    sort -g | awk '{ a[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
fmt_lat() { awk -v u="$1" 'BEGIN { if (u >= 1000) printf "%.2fms", u / 1000; else printf "%.0fus", u }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'; }
verdict() {  # verdict VALUE OP LIMIT
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        ok = (op == ">=") ? (v >= l) : (v <= l); if (v == "nan") ok = 0
        print ok ? "PASS" : "FAIL" }'
}

N=${#TARGETS[@]}
say "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg) (anything well above 0 on this" \
    "machine is someone else's work: prefer the CPU-per-request column then)"
[[ $QUICK == 1 ]] && say "quick smoke run: short, single-round numbers; not for conclusions"
say "plan: ${#CONN_LIST[@]} x (warm-up ${WARMUP}s per target, then $ROUNDS round(s) of $N targets x ${DURATION}s)," \
    "about $(( ${#CONN_LIST[@]} * N * (WARMUP + ROUNDS * DURATION) )) s of load"
for CONNS in "${CONN_LIST[@]}"; do
    RES="$TMP/results-c$CONNS.tsv"
    : >"$RES"
    say ""
    say "== $CONNS connections =="
    for t in "${TARGETS[@]}"; do
        line="$(run_wrk "$t" "$CONNS" "$WARMUP" "$TMP/wrk-warm-c$CONNS-$t.txt")"
        read -r rps _ _ req _ _ non2xx errs <<<"$line"
        [[ $t == gw_* ]] && GW_SENT=$((GW_SENT + req))
        say "  warm-up  $(printf '%-24s' "${LABEL[$t]}") $(printf '%9.0f' "$rps") req/s" \
            "$([[ $non2xx != 0 || $errs != 0 ]] && echo "  ($non2xx non-2xx, $errs socket errors)")"
    done
    for ((r = 0; r < ROUNDS; r++)); do
        for ((k = 0; k < N; k++)); do
            t=${TARGETS[$(((r + k) % N))]}
            line="$(run_wrk "$t" "$CONNS" "$DURATION" "$TMP/wrk-c$CONNS-r$r-$t.txt")"
            read -r rps p50 p99 req cpu up non2xx errs <<<"$line"
            [[ $t == gw_* ]] && GW_SENT=$((GW_SENT + req))
            printf '%s %s %s\n' "$t" "$r" "$line" >>"$RES"
            note=""
            [[ $non2xx != 0 || $errs != 0 ]] && note="  WARNING: $non2xx non-2xx, $errs socket errors"
            say "  round $((r + 1))/$ROUNDS $(printf '%-24s' "${LABEL[$t]}") $(printf '%9.0f' "$rps") req/s" \
                " p50 $(printf '%8s' "$(fmt_lat "$p50")")  p99 $(printf '%8s' "$(fmt_lat "$p99")")" \
                " cpu $(printf '%6.2f' "$cpu") us/req (upstream $(printf '%.2f' "$up"))$note"
        done
    done

    declare -A RPS=() P50=() P99=() CPU=() UPC=() BAD=()
    for t in "${TARGETS[@]}"; do
        col() { awk -v t="$t" -v c="$1" '$1 == t { print $c }' "$RES" | median; }
        RPS[$t]=$(col 3); P50[$t]=$(col 4); P99[$t]=$(col 5); CPU[$t]=$(col 7); UPC[$t]=$(col 8)
        BAD[$t]=$(awk -v t="$t" '$1 == t { s += $9 + $10 } END { print s + 0 }' "$RES")
    done
    say ""
    say "results: $CONNS connections, medians of $ROUNDS run(s) x ${DURATION}s per target" \
        "(wrk -t1 on core $CLIENT_CORE; servers on core $SERVER_CORE; ${BODY_BYTES}-byte JSON body)"
    printf '  %-24s %10s %9s %9s %12s %14s\n' target "req/s" p50 p99 "cpu us/req" "upstream us/req"
    for t in "${TARGETS[@]}"; do
        up="$(printf '%.2f' "${UPC[$t]}")"
        [[ $t == bare ]] && up="-"
        printf '  %-24s %10.0f %9s %9s %12.2f %14s%s\n' "${LABEL[$t]}" "${RPS[$t]}" \
            "$(fmt_lat "${P50[$t]}")" "$(fmt_lat "${P99[$t]}")" "${CPU[$t]}" "$up" \
            "$([[ ${BAD[$t]} != 0 ]] && echo "  (${BAD[$t]} non-2xx/socket errors!)")"
    done
    say "  (cpu: utime+stime of the server under test from /proc/PID/stat; nginx: master + children;"
    say "   upstream: the bare upstream's own CPU behind the gateway/nginx, per request; tick = $((1000000 / CLK_TCK)) us)"
    if [[ $ENCODINGS == 1 ]]; then
        say ""
        say "encodings (one ${BODY_BYTES}-byte entry; the gateway makes each encoding once and keeps it," \
            "nginx gzips every hit). cpu/req is compared on each target's least-disturbed round (its"
        say "minimum: a noisy neighbour only ever adds CPU time) and on the medians:"
        cpu_min() { awk -v t="$1" '$1 == t { print $7 }' "$RES" | sort -g | head -n 1; }
        for t in gw_zstd gw_br gw_gzip; do
            r_cpu=$(ratio "$(cpu_min "$t")" "$(cpu_min gw_hit)")
            printf '  %-36s cpu/req %6sx (medians %5sx)  req/s %6sx  (%6s bytes sent)  target cpu <= 1.00x  %s\n' \
                "${LABEL[$t]} / identity hit" "$r_cpu" "$(ratio "${CPU[$t]}" "${CPU[gw_hit]}")" \
                "$(ratio "${RPS[$t]}" "${RPS[gw_hit]}")" "${ENCODED_SIZE[$t]}" "$(verdict "$r_cpu" '<=' 1.0)"
        done
        printf '  %-36s cpu/req %6sx  req/s %6sx  (%6s bytes sent)\n' "nginx hit, gzip / nginx hit" \
            "$(ratio "${CPU[nginx_gzip]}" "${CPU[nginx_hit]}")" "$(ratio "${RPS[nginx_gzip]}" "${RPS[nginx_hit]}")" \
            "${ENCODED_SIZE[nginx_gzip]}"
        printf '  %-36s cpu/req %6sx  req/s %6sx\n' "gateway gzip hit / nginx gzip hit" \
            "$(ratio "${CPU[gw_gzip]}" "${CPU[nginx_gzip]}")" "$(ratio "${RPS[gw_gzip]}" "${RPS[nginx_gzip]}")"
        unset RPS P50 P99 CPU UPC BAD
        continue
    fi
    r_hit_nginx=$(ratio "${RPS[gw_hit]}" "${RPS[nginx_hit]}")
    r_hit_bare=$(ratio "${RPS[gw_hit]}" "${RPS[bare]}")
    r_miss_pass=$(ratio "${RPS[gw_miss]}" "${RPS[nginx_pass]}")
    r_p99=$(ratio "${P99[gw_hit]}" "${P99[nginx_hit]}")
    say ""
    say "ratios (issue 7 targets):"
    printf '  %-42s %6sx   target >= 1.30x   %s\n' "gateway hit / nginx hit (req/s)" "$r_hit_nginx" "$(verdict "$r_hit_nginx" '>=' 1.3)"
    printf '  %-42s %6sx   target >= 0.75x   %s\n' "gateway hit / bare upstream (req/s)" "$r_hit_bare" "$(verdict "$r_hit_bare" '>=' 0.75)"
    printf '  %-42s %6sx   target >= 1.20x   %s\n' "gateway miss / nginx pass-through (req/s)" "$r_miss_pass" "$(verdict "$r_miss_pass" '>=' 1.2)"
    p99_note=""
    [[ $CONNS != 32 ]] && p99_note="  (the target is defined at 32 connections)"
    printf '  %-42s %6sx   target <= 1.00x   %s  (%s vs %s)%s\n' "gateway hit p99 / nginx hit p99" \
        "$r_p99" "$(verdict "$r_p99" '<=' 1.0)" "$(fmt_lat "${P99[gw_hit]}")" "$(fmt_lat "${P99[nginx_hit]}")" "$p99_note"
    say "  other ratios: gateway hit cpu/req vs nginx hit $(ratio "${CPU[gw_hit]}" "${CPU[nginx_hit]}")x," \
        "vs bare upstream $(ratio "${CPU[gw_hit]}" "${CPU[bare]}")x; nginx hit / bare $(ratio "${RPS[nginx_hit]}" "${RPS[bare]}")x;" \
        "gateway miss / bare $(ratio "${RPS[gw_miss]}" "${RPS[bare]}")x"
    unset RPS P50 P99 CPU UPC BAD
done

say ""
say "load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
# The access logs really were written (the gateway's writer drops lines rather than block).
say ""
gw_lines=$(grep -c '"target":"access"' "$TMP/gateway-access.log" || true)
ng_lines=$(wc -l <"$TMP/nginx/access.log")
say "access logs: gateway $gw_lines JSON access lines for $GW_SENT requests counted by wrk and curl" \
    "($(awk -v a="$gw_lines" -v b="$GW_SENT" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / b; else print 0 }')% written)," \
    "$(( $(wc -c <"$TMP/gateway-access.log") / 1048576 )) MiB; nginx $ng_lines lines," \
    "$(( $(wc -c <"$TMP/nginx/access.log") / 1048576 )) MiB"
say "  (wrk counts only the requests completed in time: up to one per connection and run more were sent)"
