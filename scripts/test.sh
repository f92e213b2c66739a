#!/usr/bin/env bash
# scripts/test.sh — THE test command of this project (CI runs it via .ci/run).
#
# Provisions everything the workspace tests need, then runs
#   cargo build --workspace --bins
#   cargo test  --workspace --no-fail-fast "$@"
# and exits with cargo's exit code.  Extra arguments go to `cargo test`
# (e.g. `scripts/test.sh -p api jobs::` or `scripts/test.sh -- --nocapture`).
#
# What it provides (exported to the tests):
#   GATEWAY_TEST_DATABASE_URL  PostgreSQL; started/installed if needed.
#                              Default postgres://postgres@127.0.0.1:5432/postgres
#   GATEWAY_TEST_REDIS_URL     Redis; started/installed if needed.
#                              Default redis://127.0.0.1:6379
#   GATEWAY_TEST_REDIS_SERVER  path of a redis-server binary (fault tests start their own)
#   GATEWAY_TEST_VENV          cached venv with ray[default] + qiskit-serverless
#   GATEWAY_TEST_PYTHON        that venv's python
#   GATEWAY_TEST_RAY_URL       dashboard URL of a private Ray head started for this run
#   GATEWAY_TEST_RAY_ADDRESS   GCS address (host:port) of that head
#
# Knobs (environment):
#   GATEWAY_TEST_DRY=1              provision everything, run `cargo --version`
#                                   instead of the build and the tests
#   GATEWAY_TEST_DATABASE_URL / GATEWAY_TEST_REDIS_URL   use these servers
#   GATEWAY_TEST_REDIS_SERVER       redis-server binary to export
#   GATEWAY_TEST_CACHE_DIR          cache root (default $HOME/.cache/qs-gateway)
#   GATEWAY_TEST_BASE_PYTHON        python used to create the venv (default python3)
#   GATEWAY_TEST_RAY_GCS_PORT / GATEWAY_TEST_RAY_DASHBOARD_PORT
#                                   exact ports for the Ray head (default: 6380 / 8265
#                                   when free, otherwise free ports chosen at run time)
#   GATEWAY_TEST_RAY_TIMEOUT        seconds to wait for the Ray head (default 90)
#   CARGO_TARGET_DIR                default $HOME/.cache/qs-gateway/target
#   RUST_TEST_THREADS               default 4
#
# It never skips anything silently: whatever it cannot provide ends the run
# with a non-zero exit code and a one-line reason.  It never runs `ray stop`
# (that would stop every Ray head on the machine); it stops only its own head.
# shellcheck disable=SC2317  # functions reached only through the EXIT trap
set -euo pipefail
set +m # no job control: background jobs stay in our process group

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

RAY_VERSION=2.60.0
QS_VERSION=0.37.0

# ---------------------------------------------------------------- helpers ---
log() { printf '[test.sh] %s\n' "$*" >&2; }
step() { printf '\n[test.sh] ==> %s\n' "$*" >&2; }
die() {
  printf '[test.sh] ERROR: %s\n' "$*" >&2
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
can_apt() { is_root && have apt-get; }

# Print the last lines of a log file, indented, to stderr.
show_tail() { # file [lines]
  [ -s "$1" ] || return 0
  printf '[test.sh] --- last lines of %s ---\n' "$1" >&2
  tail -n "${2:-30}" "$1" | sed 's/^/    /' >&2
}

APT_UPDATED=0
apt_install() { # packages...
  can_apt || die "need to install '$*' but cannot (not root or no apt-get); install it and re-run"
  local aptlog="$RUN_TMP/apt.log"
  if [ "$APT_UPDATED" != 1 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >"$aptlog" 2>&1 ||
      { show_tail "$aptlog"; die "apt-get update failed"; }
    APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
    </dev/null >"$aptlog" 2>&1 || { show_tail "$aptlog"; die "apt-get install $* failed"; }
}

# "host port" of a URL (default port when the URL has none).
url_host_port() { # url default_port
  python3 - "$1" "$2" <<'EOF'
import sys, urllib.parse
try:
    u = urllib.parse.urlsplit(sys.argv[1])
    print(u.hostname or "127.0.0.1", u.port or int(sys.argv[2]))
except ValueError as e:
    sys.exit(f"bad URL: {e}")
EOF
}

# URL with any password replaced by ***, for printing.
redact_url() { printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'; }
url_has_password() { printf '%s' "$1" | grep -Eq '://[^:/@]*:[^@/]*@'; }
is_local_host() { case "$1" in 127.0.0.1 | localhost | ::1) return 0 ;; *) return 1 ;; esac; }

# shellcheck disable=SC2016  # $1/$2 expand in the inner bash
tcp_open() { timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every second.
wait_until() {
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
  log "$what is ready"
}

# ---- process bookkeeping (reads /proc only: no dependency on procps) -------
# State letter of a pid ("" when gone); zombies count as gone.
proc_alive() {
  local line rest
  { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
  rest=${line##*) }
  [ "${rest%% *}" != Z ]
}

# Every live process that belongs to the tree started as session leader ROOT:
# its session (the leader, its process groups, Ray's workers) plus all
# descendants (Ray job drivers run in sessions of their own).
related_pids() { # root
  local root=$1 f line pid rest changed
  local -a fld
  local -A parent=() sess=() state=() keep=()
  for f in /proc/[0-9]*/stat; do
    { read -r line <"$f"; } 2>/dev/null || continue
    pid=${line%% *}
    rest=${line##*) }
    read -r -a fld <<<"$rest"
    state[$pid]=${fld[0]}
    parent[$pid]=${fld[1]}
    sess[$pid]=${fld[3]}
  done
  [ -n "${state[$root]:-}" ] && keep[$root]=1
  for pid in "${!sess[@]}"; do
    [ "${sess[$pid]}" = "$root" ] && keep[$pid]=1
  done
  changed=1
  while [ "$changed" = 1 ]; do
    changed=0
    for pid in "${!parent[@]}"; do
      if [ -z "${keep[$pid]:-}" ] && [ -n "${keep[${parent[$pid]}]:-}" ]; then
        keep[$pid]=1
        changed=1
      fi
    done
  done
  for pid in "${!keep[@]}"; do
    [ "$pid" = "$$" ] || [ "$pid" = "$BASHPID" ] || [ "${state[$pid]}" = Z ] || echo "$pid"
  done
}

# Stop the tree of ROOT (see related_pids), bounded:
#   leader_first=1 (Ray): TERM the leader only and give it 10 s: `ray start
#     --block` stops its own processes in order (TERM to all of them at once
#     leaves it waiting on dead ones);
#   then TERM everything left (the process group and every tree member) and
#   wait (10 s, or 5 s after a leader-first stage), then KILL what is left.
STOP_ALIVE=()
stop_wait() { # root seconds pids...: sets STOP_ALIVE to what is still alive
  local root=$1 tries=$(($2 * 2)) i p
  local -a more
  local -A seen
  shift 2
  for ((i = 0; i < tries; i++)); do
    STOP_ALIVE=()
    seen=()
    mapfile -t more < <(related_pids "$root")
    for p in "$@" "${more[@]}"; do
      [ -z "${seen[$p]:-}" ] && proc_alive "$p" && STOP_ALIVE+=("$p")
      seen[$p]=1
    done
    [ "${#STOP_ALIVE[@]}" -eq 0 ] && return 0
    sleep 0.5
  done
  return 1
}
stop_tree() { # root name leader_first
  local root=$1 name=$2 leader_first=$3 grace=10
  local -a pids
  mapfile -t pids < <(related_pids "$root")
  if [ "${#pids[@]}" -gt 0 ]; then
    log "stopping $name (${#pids[@]} processes, session $root)"
    if [ "$leader_first" = 1 ]; then
      kill -TERM "$root" 2>/dev/null || true
      stop_wait "$root" 10 "${pids[@]}" && { wait "$root" 2>/dev/null || true; return 0; }
      log "$name: ${#STOP_ALIVE[@]} processes left after 10 s, sending SIGTERM to all of them"
      grace=5
    fi
    kill -TERM -- "-$root" 2>/dev/null || true
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! stop_wait "$root" "$grace" "${pids[@]}"; then
      log "$name: ${#STOP_ALIVE[@]} processes still alive after SIGTERM, sending SIGKILL"
      kill -KILL "${STOP_ALIVE[@]}" 2>/dev/null || true
    fi
  fi
  wait "$root" 2>/dev/null || true
}

RUN_TMP=""
RAY_PID=""
CARGO_PID=""
SUMMARY=""
cleanup() {
  local rc=$?
  set +e
  trap - EXIT
  # Cleanup is bounded (~25 s): let nothing cut it short, not even a closed
  # output pipe (Ctrl-C on `scripts/test.sh | tee log` kills tee first).
  trap '' INT TERM HUP PIPE
  [ -n "$CARGO_PID" ] && stop_tree "$CARGO_PID" "cargo" 0
  [ -n "$RAY_PID" ] && stop_tree "$RAY_PID" "Ray head" 1
  [ -n "$RUN_TMP" ] && rm -rf -- "$RUN_TMP"
  # The totals close the output, after the Ray head's shutdown lines.
  [ -n "$SUMMARY" ] && echo "$SUMMARY"
  exit "$rc"
}
trap cleanup EXIT
on_signal() { # name exit_code
  trap '' PIPE
  log "$1: cleaning up" || true
  exit "$2"
}
trap 'on_signal "interrupted (SIGINT)" 130' INT
trap 'on_signal "terminated (SIGTERM)" 143' TERM
trap 'on_signal "hang-up (SIGHUP)" 129' HUP

# ------------------------------------------------------------ preflight ---
step "preflight"
have cargo || die "cargo not found in PATH (install Rust with rustup)"
have python3 || die "python3 not found in PATH (Python 3.11 is required for the Ray venv)"
HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
[ -n "$HOME" ] || die "HOME is not set and cannot be determined"
CACHE_DIR=${GATEWAY_TEST_CACHE_DIR:-$HOME/.cache/qs-gateway}
mkdir -p "$CACHE_DIR" || die "cannot create cache dir $CACHE_DIR"
# Short path on purpose: Ray's unix socket paths live under it (limit ~107 chars).
RUN_TMP=$(mktemp -d /tmp/qsgw-ray.XXXXXX) || die "cannot create a temp dir in /tmp"
log "repo $REPO_ROOT, user $(id -un), cache $CACHE_DIR, run dir $RUN_TMP"

# ------------------------------------------------------------- postgres ---
step "PostgreSQL"
export GATEWAY_TEST_DATABASE_URL="${GATEWAY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB_URL_SHOWN=$(redact_url "$GATEWAY_TEST_DATABASE_URL")
hp=$(url_host_port "$GATEWAY_TEST_DATABASE_URL" 5432) || die "GATEWAY_TEST_DATABASE_URL is not a valid URL: $DB_URL_SHOWN"
read -r PG_HOST PG_PORT <<<"$hp"

pg_ready() {
  if have pg_isready; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3 >/dev/null 2>&1
  else
    tcp_open "$PG_HOST" "$PG_PORT"
  fi
}
# "version name status" of the Debian cluster configured for $PG_PORT.
pg_cluster() {
  have pg_lsclusters || return 0
  pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2, $4; exit }'
}

PG_CLUSTER=$(pg_cluster)
if pg_ready; then
  log "PostgreSQL is accepting connections on $PG_HOST:$PG_PORT"
else
  is_local_host "$PG_HOST" || die "PostgreSQL at $PG_HOST:$PG_PORT is not reachable (not local: will not start it)"
  log "PostgreSQL is not accepting connections on $PG_HOST:$PG_PORT; trying to start it"
  if [ -z "$PG_CLUSTER" ] && { ! have pg_lsclusters || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; }; then
    can_apt || die "PostgreSQL is not running on $PG_HOST:$PG_PORT and no cluster is installed; run as root (apt-get) or install/start PostgreSQL yourself"
    apt_install postgresql
    PG_CLUSTER=$(pg_cluster)
  fi
  [ -n "$PG_CLUSTER" ] || die "no PostgreSQL cluster is configured for port $PG_PORT (pg_lsclusters: $(pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2":"$3}' | tr '\n' ' '))"
  read -r PG_VER PG_NAME PG_STATUS <<<"$PG_CLUSTER"
  if ! pg_ready && [ "$PG_STATUS" != online ]; then
    log "pg_ctlcluster --skip-systemctl-redirect $PG_VER $PG_NAME start"
    out=$(pg_ctlcluster --skip-systemctl-redirect "$PG_VER" "$PG_NAME" start 2>&1) ||
      die "could not start PostgreSQL cluster $PG_VER/$PG_NAME: $(printf '%s' "$out" | tr '\n' ' ')"
  fi
  wait_until 60 "PostgreSQL on $PG_HOST:$PG_PORT" pg_ready ||
    die "PostgreSQL on $PG_HOST:$PG_PORT did not become ready within 60 s (see /var/log/postgresql/)"
fi

if ! have psql && can_apt; then apt_install postgresql-client; fi

# Put trust lines for loopback at the top of the cluster's pg_hba.conf.
pg_allow_loopback_trust() {
  [ -n "$PG_CLUSTER" ] || return 1
  local ver name hba mark='# qs-gateway scripts/test.sh: password-less test access over loopback'
  read -r ver name _ <<<"$PG_CLUSTER"
  hba=/etc/postgresql/$ver/$name/pg_hba.conf
  [ -w "$hba" ] || return 1
  grep -qF "$mark" "$hba" && return 1
  log "allowing password-less (trust) logins over 127.0.0.1/::1 in $hba"
  { printf '%s\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' "$mark"; cat "$hba"; } >"$RUN_TMP/pg_hba.conf"
  cat "$RUN_TMP/pg_hba.conf" >"$hba"
  pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload >/dev/null 2>&1
}
pg_query_version() {
  PGCONNECT_TIMEOUT=5 psql -w -X -A -t -q -d "$GATEWAY_TEST_DATABASE_URL" -c 'SHOW server_version' </dev/null 2>&1
}

if have psql; then
  if ! PG_VERSION=$(pg_query_version); then
    if is_root && is_local_host "$PG_HOST" && ! url_has_password "$GATEWAY_TEST_DATABASE_URL" &&
      pg_allow_loopback_trust; then
      sleep 1
      PG_VERSION=$(pg_query_version) ||
        die "cannot log in to PostgreSQL as $DB_URL_SHOWN even after allowing trust: $(printf '%s' "$PG_VERSION" | head -n1)"
    else
      die "cannot log in to PostgreSQL as $DB_URL_SHOWN: $(printf '%s' "$PG_VERSION" | head -n1)"
    fi
  fi
  PG_VERSION=$(printf '%s' "$PG_VERSION" | head -n1)
  log "logged in to PostgreSQL $PG_VERSION as $DB_URL_SHOWN"
else
  PG_VERSION="unknown (psql not installed; login not checked)"
  log "psql not found and cannot be installed: login not checked here, the tests will"
fi

# ---------------------------------------------------------------- redis ---
step "Redis"
export GATEWAY_TEST_REDIS_URL="${GATEWAY_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
REDIS_URL_SHOWN=$(redact_url "$GATEWAY_TEST_REDIS_URL")
hp=$(url_host_port "$GATEWAY_TEST_REDIS_URL" 6379) || die "GATEWAY_TEST_REDIS_URL is not a valid URL: $REDIS_URL_SHOWN"
read -r REDIS_HOST REDIS_PORT <<<"$hp"

find_redis_server() {
  local c
  for c in "${GATEWAY_TEST_REDIS_SERVER:-}" "$(command -v redis-server || true)" \
    /usr/bin/redis-server /usr/sbin/redis-server /usr/local/bin/redis-server; do
    if [ -n "$c" ] && [ -x "$c" ]; then
      printf '%s\n' "$c"
      return 0
    fi
  done
  return 1
}
if [ -n "${GATEWAY_TEST_REDIS_SERVER:-}" ] && [ ! -x "$GATEWAY_TEST_REDIS_SERVER" ]; then
  die "GATEWAY_TEST_REDIS_SERVER=$GATEWAY_TEST_REDIS_SERVER is not an executable file"
fi
if ! REDIS_SERVER_BIN=$(find_redis_server); then
  can_apt || die "redis-server not found (the tests need the binary even when Redis runs); install it: apt-get install redis-server"
  apt_install redis-server
  REDIS_SERVER_BIN=$(find_redis_server) || die "redis-server still not found after apt-get install redis-server"
fi
export GATEWAY_TEST_REDIS_SERVER="$REDIS_SERVER_BIN"

redis_ping() {
  if have redis-cli; then
    [ "$(timeout 5 redis-cli -u "$GATEWAY_TEST_REDIS_URL" ping 2>/dev/null)" = PONG ]
  else
    # shellcheck disable=SC2016  # $1/$2/$l expand in the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "PING\r\n" >&3 && IFS= read -r l <&3 && [[ $l == +PONG* ]]' \
      _ "$REDIS_HOST" "$REDIS_PORT" 2>/dev/null
  fi
}
if redis_ping; then
  log "Redis answers PING on $REDIS_HOST:$REDIS_PORT"
else
  is_local_host "$REDIS_HOST" || die "Redis at $REDIS_HOST:$REDIS_PORT does not answer PING (not local: will not start it)"
  REDIS_LOG="$CACHE_DIR/redis-$REDIS_PORT.log"
  log "Redis does not answer on $REDIS_HOST:$REDIS_PORT; starting $REDIS_SERVER_BIN (log $REDIS_LOG)"
  "$REDIS_SERVER_BIN" --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /tmp --logfile "$REDIS_LOG" --pidfile "$CACHE_DIR/redis-$REDIS_PORT.pid" </dev/null >/dev/null 2>&1 ||
    { show_tail "$REDIS_LOG"; die "redis-server failed to start on $REDIS_HOST:$REDIS_PORT"; }
  wait_until 20 "Redis on $REDIS_HOST:$REDIS_PORT" redis_ping ||
    { show_tail "$REDIS_LOG"; die "Redis on $REDIS_HOST:$REDIS_PORT did not answer PING within 20 s"; }
fi
REDIS_VERSION=""
if have redis-cli; then
  REDIS_VERSION=$(timeout 5 redis-cli -u "$GATEWAY_TEST_REDIS_URL" info server 2>/dev/null |
    tr -d '\r' | sed -n 's/^redis_version://p' || true)
fi
REDIS_VERSION=${REDIS_VERSION:-unknown}
REDIS_BIN_VERSION=$("$REDIS_SERVER_BIN" --version 2>/dev/null | sed -n 's/.* v=\([^ ]*\).*/\1/p' || true)

# ----------------------------------------------------------- python venv ---
step "Python venv with ray[default]==$RAY_VERSION and qiskit-serverless==$QS_VERSION"
VENV="$CACHE_DIR/ray-$RAY_VERSION-qs-$QS_VERSION"
VENV_PY="$VENV/bin/python"
BASE_PY=${GATEWAY_TEST_BASE_PYTHON:-python3}
have "$BASE_PY" || die "$BASE_PY not found (set GATEWAY_TEST_BASE_PYTHON)"

venv_ok() { # checks imports and exact versions
  [ -x "$VENV_PY" ] || return 1
  "$VENV_PY" - "$RAY_VERSION" "$QS_VERSION" <<'EOF'
import importlib.metadata as md, sys
import ray, qiskit_serverless  # noqa: F401  (must import)
want = {"ray": sys.argv[1], "qiskit-serverless": sys.argv[2]}
bad = [f"{k}=={md.version(k)} (want {v})" for k, v in want.items() if md.version(k) != v]
if bad:
    sys.exit("wrong versions: " + ", ".join(bad))
EOF
}

create_venv() {
  local out pyver
  log "creating venv $VENV with $BASE_PY ($("$BASE_PY" --version 2>&1))"
  if ! out=$("$BASE_PY" -m venv "$VENV" 2>&1); then
    rm -rf -- "$VENV"
    if printf '%s' "$out" | grep -qi ensurepip && can_apt; then
      pyver=$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
      if apt-cache show "python$pyver-venv" >/dev/null 2>&1; then
        apt_install python3-venv "python$pyver-venv"
      else
        apt_install python3-venv
      fi
      out=$("$BASE_PY" -m venv "$VENV" 2>&1) ||
        { rm -rf -- "$VENV"; die "$BASE_PY -m venv failed even after installing python3-venv: $(printf '%s' "$out" | tail -n1)"; }
    else
      die "$BASE_PY -m venv failed: $(printf '%s' "$out" | tail -n1)"
    fi
  fi
  local piplog="$CACHE_DIR/pip-install.log"
  log "pip install \"ray[default]==$RAY_VERSION\" \"qiskit-serverless==$QS_VERSION\" (a few minutes; log $piplog)"
  "$VENV_PY" -m pip install --disable-pip-version-check --no-input --progress-bar off \
    "ray[default]==$RAY_VERSION" "qiskit-serverless==$QS_VERSION" </dev/null >"$piplog" 2>&1 ||
    { show_tail "$piplog"; die "pip install into $VENV failed (full log: $piplog)"; }
  out=$(venv_ok 2>&1) || die "fresh venv $VENV does not import ray/qiskit_serverless: $(printf '%s' "$out" | tail -n1)"
  touch "$VENV/.complete"
  log "venv installed and verified"
}

# One installer at a time per cache dir (other runs on this machine wait).
if have flock; then
  exec 9>"$CACHE_DIR/.venv.lock"
  flock -w 1800 9 || die "timed out waiting 30 min for the venv lock $CACHE_DIR/.venv.lock"
fi
if [ -f "$VENV/.complete" ] && venv_ok 2>/dev/null; then
  log "reusing cached venv $VENV"
elif [ -d "$VENV" ] && [ ! -f "$VENV/.complete" ] && venv_ok 2>/dev/null &&
  "$VENV_PY" -m pip check >/dev/null 2>&1; then
  # Installed before markers existed: complete and consistent, so adopt it.
  touch "$VENV/.complete"
  log "adopting existing venv $VENV (imports and pip check OK; marker written)"
else
  if [ -e "$VENV" ]; then
    log "cached venv $VENV is incomplete or broken: recreating it"
    rm -rf -- "$VENV"
  fi
  create_venv
fi
if have flock; then exec 9>&-; fi
export GATEWAY_TEST_VENV="$VENV"
export GATEWAY_TEST_PYTHON="$VENV_PY"
PY_VERSION=$("$VENV_PY" -c 'import platform; print(platform.python_version())')

# ------------------------------------------------------------- ray head ---
step "Ray head (private to this run)"
# Ports: GCS 6380 and dashboard 8265 when free (6379 is Redis's), every other
# port Ray would otherwise take at a fixed default (client server 10001,
# dashboard agent 52365, ...) is chosen free at run time, from 24000-31999:
# below the kernel's ephemeral range and clear of Ray's client proxy (23000+).
pick_ports() { # spec... where spec is "=PORT" (exact), "~PORT" (preferred) or "0"
  "$VENV_PY" - "$@" <<'EOF'
import random, socket, sys
def free(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("0.0.0.0", p))  # fails if anything listens on p at any address
        return True
    except OSError:
        return False
    finally:
        s.close()
chosen = []
for spec in sys.argv[1:]:
    if spec.startswith("="):
        p = int(spec[1:])
        if p in chosen or not free(p):
            sys.exit(f"requested port {p} is already in use")
    else:
        p = int(spec.lstrip("~"))
        if not p or p in chosen or not free(p):
            for _ in range(2000):
                p = random.randint(24000, 31999)
                if p not in chosen and free(p):
                    break
            else:
                sys.exit("could not find a free port")
    chosen.append(p)
print(" ".join(map(str, chosen)))
EOF
}
gcs_spec="~6380"
dash_spec="~8265"
[ -n "${GATEWAY_TEST_RAY_GCS_PORT:-}" ] && gcs_spec="=$GATEWAY_TEST_RAY_GCS_PORT"
[ -n "${GATEWAY_TEST_RAY_DASHBOARD_PORT:-}" ] && dash_spec="=$GATEWAY_TEST_RAY_DASHBOARD_PORT"
ports=$(pick_ports "$gcs_spec" "$dash_spec" 0 0 0 0 0 0 0 2>&1) || die "Ray ports: $ports"
read -r RAY_GCS_PORT RAY_DASH_PORT RAY_CLIENT_PORT RAY_AGENT_HTTP_PORT RAY_AGENT_GRPC_PORT \
  RAY_RUNTIME_ENV_PORT RAY_METRICS_PORT RAY_NODE_MANAGER_PORT RAY_OBJECT_MANAGER_PORT <<<"$ports"

RAY_LOG="$RUN_TMP/ray-start.log"
RAY_TIMEOUT=${GATEWAY_TEST_RAY_TIMEOUT:-90}
ray_args=(
  start --head --block
  --node-ip-address=127.0.0.1
  --port="$RAY_GCS_PORT"
  --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASH_PORT"
  --ray-client-server-port="$RAY_CLIENT_PORT"
  --dashboard-agent-listen-port="$RAY_AGENT_HTTP_PORT"
  --dashboard-agent-grpc-port="$RAY_AGENT_GRPC_PORT"
  --runtime-env-agent-port="$RAY_RUNTIME_ENV_PORT"
  --metrics-export-port="$RAY_METRICS_PORT"
  --node-manager-port="$RAY_NODE_MANAGER_PORT"
  --object-manager-port="$RAY_OBJECT_MANAGER_PORT"
  --num-cpus=2
  --object-store-memory=$((512 * 1024 * 1024))
  --disable-usage-stats
  --temp-dir="$RUN_TMP"
)
log "ray ${ray_args[*]}"
# setsid: own session + process group, so cleanup can take down exactly this
# head (and its workers) and nothing else. PATH has the venv first so that
# job entrypoints run with the venv's python.
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM tear down at once instead
#   of draining running jobs for up to 30 s (this head is thrown away anyway).
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: single-node mode, in which Ray keeps the
#   node on 127.0.0.1; otherwise it swaps --node-ip-address=127.0.0.1 for the
#   machine's interface address.
env -u RAY_ADDRESS PATH="$VENV/bin:$PATH" RAY_USAGE_STATS_ENABLED=0 \
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
  setsid -w "$VENV/bin/ray" "${ray_args[@]}" </dev/null >"$RAY_LOG" 2>&1 &
RAY_PID=$!

http_ok() { "$VENV_PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3).read()' "$1" >/dev/null 2>&1; }
ray_failed() {
  local f
  show_tail "$RAY_LOG" 20
  for f in dashboard.log gcs_server.err raylet.err raylet.out dashboard_agent.log; do
    show_tail "$RUN_TMP/session_latest/logs/$f" 15
  done
  die "$1"
}
deadline=$((SECONDS + RAY_TIMEOUT))
while :; do
  proc_alive "$RAY_PID" || ray_failed "ray start exited before the head was ready"
  if http_ok "http://127.0.0.1:$RAY_DASH_PORT/api/version" &&
    http_ok "http://127.0.0.1:$RAY_AGENT_HTTP_PORT/api/local_raylet_healthz"; then
    break
  fi
  [ "$SECONDS" -lt "$deadline" ] || ray_failed "Ray head not ready within $RAY_TIMEOUT s (dashboard http://127.0.0.1:$RAY_DASH_PORT/api/version)"
  sleep 1
done
# $RAY_PID must lead its own session, or cleanup could not find its workers.
{ read -r line </proc/"$RAY_PID"/stat; } 2>/dev/null || line=""
read -r -a fld <<<"${line##*) }"
[ "${fld[3]:-}" = "$RAY_PID" ] || die "Ray head (pid $RAY_PID) does not lead its own session (sid ${fld[3]:-?})"
RAY_REPORTED_VERSION=$("$VENV_PY" -c 'import json, sys, urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1], timeout=5)).get("ray_version", "?"))' \
  "http://127.0.0.1:$RAY_DASH_PORT/api/version" 2>/dev/null || echo "?")
log "Ray head is up (pid $RAY_PID) after $((SECONDS - deadline + RAY_TIMEOUT)) s"
export GATEWAY_TEST_RAY_URL="http://127.0.0.1:$RAY_DASH_PORT"
export GATEWAY_TEST_RAY_ADDRESS="127.0.0.1:$RAY_GCS_PORT"

# ---------------------------------------------------------------- cargo ---
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/qs-gateway/target}"
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"

step "test environment"
cat >&2 <<EOF
  PostgreSQL  $PG_VERSION    GATEWAY_TEST_DATABASE_URL=$DB_URL_SHOWN
  Redis       $REDIS_VERSION    GATEWAY_TEST_REDIS_URL=$REDIS_URL_SHOWN
              GATEWAY_TEST_REDIS_SERVER=$GATEWAY_TEST_REDIS_SERVER (${REDIS_BIN_VERSION:-?})
  Python      $PY_VERSION    GATEWAY_TEST_PYTHON=$GATEWAY_TEST_PYTHON
  Ray         $RAY_REPORTED_VERSION    GATEWAY_TEST_RAY_URL=$GATEWAY_TEST_RAY_URL  GATEWAY_TEST_RAY_ADDRESS=$GATEWAY_TEST_RAY_ADDRESS
              qiskit-serverless $QS_VERSION, head pid $RAY_PID, temp dir $RUN_TMP
  Rust        $(cargo --version)
              CARGO_TARGET_DIR=$CARGO_TARGET_DIR  RUST_TEST_THREADS=$RUST_TEST_THREADS
EOF

# Cargo runs in its own session too (like Ray): on INT/TERM the cleanup stops
# cargo, the test binaries and whatever they spawned, then the Ray head.
run_cargo() {
  local rc=0
  # Everything cargo prints is also kept, to total the test results at the end.
  setsid -w cargo "$@" > >(tee -a "$CARGO_LOG") 2>&1 &
  CARGO_PID=$!
  wait "$CARGO_PID" || rc=$?
  CARGO_PID=""
  return "$rc"
}

CARGO_LOG="$RUN_TMP/cargo.log"
: >"$CARGO_LOG"

if [ "${GATEWAY_TEST_DRY:-0}" = 1 ]; then
  step "GATEWAY_TEST_DRY=1: skipping build and tests, running cargo --version"
  run_cargo --version
  exit 0
fi

# Tests drop their databases; one that crashed mid-way leaves its own. Drop
# those older than an hour (never a concurrent run's).
stale_dbs=$(psql -w -X -A -t -q -d "$GATEWAY_TEST_DATABASE_URL" -c "SELECT datname FROM pg_database
  WHERE datname LIKE 'gwt\_%' AND (pg_stat_file('base/' || oid || '/PG_VERSION')).modification < now() - interval '1 hour'" \
  </dev/null 2>/dev/null || true)
for db in $stale_dbs; do
  psql -w -X -q -d "$GATEWAY_TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" </dev/null >/dev/null 2>&1 || true
done

step "cargo build --workspace --bins"
rc=0
run_cargo build --workspace --bins || rc=$?
if [ "$rc" -ne 0 ]; then
  log "ERROR: cargo build --workspace --bins failed (exit $rc)"
  exit "$rc"
fi

step "cargo test --workspace --no-fail-fast $*"
rc=0
run_cargo test --workspace --no-fail-fast "$@" || rc=$?
# One closing line over all test binaries (the last cargo line is usually a
# doc-test run with nothing in it).
read -r passed failed ignored < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i+1) ~ /^passed;?$/) p += $i
      if ($(i+1) ~ /^failed;?$/) f += $i
      if ($(i+1) ~ /^ignored;?$/) g += $i
    }
  } END { print p + 0, f + 0, g + 0 }' "$CARGO_LOG")
if [ "$rc" -eq 0 ] && [ "$passed" -eq 0 ]; then
  log "ERROR: cargo test ran no test"
  rc=1
fi
if [ "$rc" -eq 0 ]; then
  log "cargo test passed"
else
  log "cargo test failed (exit $rc)"
fi
SUMMARY="summary: $passed passed, $failed failed, $ignored skipped"
exit "$rc"
