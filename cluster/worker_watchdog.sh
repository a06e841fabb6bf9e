#!/usr/bin/env bash
# Ends a worker machine's Ray once its raylet has gone. `ray down` on Ray's local provider runs `ray stop` on
# the head only: a worker's raylet then exits by itself about a minute later (it has lost the head), but the
# rest of that machine's Ray (its log monitor) would run on until someone runs `ray stop` there.
# cluster/local.yaml's worker_start_ray_commands run it:
#
#   bash ~/msx/cluster/worker_watchdog.sh stop    before `ray stop`: ends the watchdog of the Ray about to be
#                                                 stopped, so that it cannot stop the Ray started next
#   bash ~/msx/cluster/worker_watchdog.sh start   after `ray start`: watches the raylet it started
set -euo pipefail

pidfile=~/.msx-worker-watchdog.pid
name=msx-worker-watchdog

case "${1:-}" in
    stop)
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile")
            # Only that watchdog, even if its process id was given to another process since.
            if grep -qa "$name" "/proc/$pid/cmdline" 2>/dev/null; then
                kill "$pid"
            fi
            rm -f "$pidfile"
        fi
        ;;
    start)
        raylet=$(pgrep -n -u "$(id -u)" -x raylet) || { echo "worker_watchdog.sh: no raylet is running to watch" >&2; exit 1; }
        # Its own session, so that it outlives the SSH session that started it.
        setsid nohup bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 5; done; rm -f "$2"; exec ray stop' \
            "$name" "$raylet" "$pidfile" > /dev/null 2>&1 < /dev/null &
        echo $! > "$pidfile"
        ;;
    *)
        echo "usage: worker_watchdog.sh start|stop" >&2
        exit 2
        ;;
esac
