#!/usr/bin/env bash
# The topology of docker/compose.yaml without docker, on 127.0.0.1: a bootstrap DHT node, one peer per span of
# MODEL's blocks, the OpenAI-compatible API and the health monitor, each its own `swarm-peer` process.
#
#   docker/local.sh                                  # SmolLM2, blocks 0:15 and 15:30
#   MODEL=path/to/checkpoint SPANS="0:2 2:4" MONITOR=0 docker/local.sh
#
# It prints "API ready at http://127.0.0.1:PORT" once every process is ready (its OpenAI base URL is that
# plus /v1), then waits. Ctrl-C, SIGTERM, or any of its processes exiting stops everything it started: each
# process runs in its own process group (setsid), so its DHT process and p2pd daemon are ended with it.
#
# Settings (environment variables):
#   MODEL          checkpoint directory or `smollm2` (default: smollm2)
#   SPANS          blocks of each peer, START:END separated by spaces (default: "0:15 15:30")
#   API_PORT       the API's port (default: 0, any free port)
#   MONITOR        1 to start the monitor too, 0 not to (default: 1)
#   MONITOR_PORT   the monitor's port (default: 0, any free port)
#   PEER_ARGS      more arguments for every `join` (e.g. "--compute-threads 1"), split on spaces
#   API_ARGS       more arguments for `api` (e.g. "--max-tokens 256"), split on spaces
#   START_TIMEOUT  seconds each process may take to become ready (default: 300)
#   STOP_TIMEOUT   seconds each stage of the shutdown may take before SIGKILL (default: 20)
#   LOG_DIR        where each process's stdout and stderr go (default: a new temporary directory)
#   SWARM_PEER     the command to run (default: swarm-peer)
set -euo pipefail

MODEL=${MODEL:-smollm2}
SPANS=${SPANS:-"0:15 15:30"}
API_PORT=${API_PORT:-0}
MONITOR=${MONITOR:-1}
MONITOR_PORT=${MONITOR_PORT:-0}
START_TIMEOUT=${START_TIMEOUT:-300}
STOP_TIMEOUT=${STOP_TIMEOUT:-20}
SWARM_PEER=${SWARM_PEER:-swarm-peer}
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/swarm-local.XXXXXX")}
read -r -a peer_args <<<"${PEER_ARGS:-}"
read -r -a api_args <<<"${API_ARGS:-}"
read -r -a spans <<<"$SPANS"
mkdir -p "$LOG_DIR"

export PYTHONUNBUFFERED=1 # readiness lines must reach the logs as they are printed

# started processes, in start order: "pid name" (each pid is also its process group's id)
started=()

log() { echo "local.sh: $*" >&2; }

# start NAME ARGS...: runs `swarm-peer ARGS...` in a new session, stdout to $LOG_DIR/NAME.out, stderr to .err
start() {
    local name=$1
    shift
    setsid "$SWARM_PEER" "$@" >"$LOG_DIR/$name.out" 2>"$LOG_DIR/$name.err" </dev/null &
    started+=("$! $name")
    log "started $name (pid $!): swarm-peer $*"
}

pid_of() {
    local entry
    for entry in "${started[@]}"; do
        if [[ ${entry#* } == "$1" ]]; then
            echo "${entry%% *}"
            return
        fi
    done
}

# wait_line NAME REGEX: sets $line to the first stdout line of NAME matching REGEX; fails after START_TIMEOUT
# seconds, or as soon as NAME exits, with the end of its log (runs in this shell, so a signal ends it at once)
wait_line() {
    local name=$1 regex=$2 pid deadline=$((SECONDS + START_TIMEOUT))
    pid=$(pid_of "$name")
    while true; do
        line=$(grep -m1 -E "$regex" "$LOG_DIR/$name.out" || true)
        [[ -n $line ]] && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited before it was ready; its log ($LOG_DIR/$name.err) ends with:"
            tail -n 20 "$LOG_DIR/$name.err" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$name was not ready within $START_TIMEOUT s; its log ($LOG_DIR/$name.err) ends with:"
            tail -n 20 "$LOG_DIR/$name.err" >&2
            return 1
        fi
        sleep 0.2
    done
}

# stop_some PATTERN: SIGTERM the leaders of the started processes whose name matches PATTERN, wait until they
# exit (at most STOP_TIMEOUT s), then SIGKILL what is left of their process groups (p2pd, DHT processes)
stop_some() {
    local pattern=$1 entry pid pids=() deadline=$((SECONDS + STOP_TIMEOUT))
    for entry in "${started[@]}"; do
        # shellcheck disable=SC2053 # PATTERN is a glob
        if [[ ${entry#* } == $pattern ]]; then
            pids+=("${entry%% *}")
        fi
    done
    ((${#pids[@]})) || return 0
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true # only the leader: it still needs its p2pd to say goodbye
    done
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not exit within $STOP_TIMEOUT s of SIGTERM: killing its process group"
        fi
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    wait "${pids[@]}" 2>/dev/null || true
}

stopping=0
ticker="" # the main loop's `sleep`
line=""   # what wait_line found
cleanup() {
    local status=$?
    ((stopping)) && return
    stopping=1
    trap '' INT TERM # a second Ctrl-C must not cut the teardown short
    [[ -z $ticker ]] || kill "$ticker" 2>/dev/null || true
    if ((${#started[@]})); then
        log "stopping everything (logs in $LOG_DIR)"
        # clients first, then peers (they announce OFFLINE through the bootstrap), then the bootstrap
        stop_some "api"
        stop_some "monitor"
        stop_some "peer-*"
        stop_some "bootstrap"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start bootstrap dht --host 127.0.0.1 --port 0
wait_line bootstrap '^/ip4/'
maddr=$line
log "bootstrap: $maddr"

# everything else starts at once (the API and the monitor need only the bootstrap to start)
for span in "${spans[@]}"; do
    start "peer-${span/:/-}" join "$MODEL" --initial-peers "$maddr" --blocks "$span" "${peer_args[@]}"
done
start api api "$MODEL" --initial-peers "$maddr" --host 127.0.0.1 --port "$API_PORT" "${api_args[@]}"
if [[ $MONITOR == 1 ]]; then
    start monitor monitor --initial-peers "$maddr" --host 127.0.0.1 --port "$MONITOR_PORT"
fi

for span in "${spans[@]}"; do
    wait_line "peer-${span/:/-}" '^Serving blocks '
    log "$line"
done
if [[ $MONITOR == 1 ]]; then
    wait_line monitor '^Monitor listening on '
    log "monitor: ${line#Monitor listening on }"
fi
wait_line api '^API listening on '
api_url=${line#API listening on }

echo "bootstrap $maddr"
echo "API ready at $api_url"

# serve until a signal, or until one of the processes exits (then stop the rest, and fail)
while true; do
    for entry in "${started[@]}"; do
        if ! kill -0 "${entry%% *}" 2>/dev/null; then
            log "${entry#* } exited; its log ($LOG_DIR/${entry#* }.err) ends with:"
            tail -n 20 "$LOG_DIR/${entry#* }.err" >&2
            exit 1
        fi
    done
    sleep 1 &
    ticker=$!
    wait "$ticker" || true
done
