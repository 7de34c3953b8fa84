#!/bin/sh
# The container's entry: runs `shoal "$@"` after finding peers to join through.
#
# Every flag comes from its SHOAL_* variable (docs/config.md). When BOOTSTRAP_DIR names a
# directory shared by the swarm's containers (a compose volume, a Kubernetes emptyDir filled
# by an init container), a worker writes its ticket there as $HOSTNAME.ticket, and every node
# joins through the tickets of the others (one live peer is enough). BOOTSTRAP_PEERS (default
# 0) is how many other tickets to wait for before starting, at most BOOTSTRAP_WAIT seconds
# (default 120). A SHOAL_JOIN given explicitly wins.
set -eu

dir="${BOOTSTRAP_DIR:-}"
if [ -n "$dir" ]; then
    me="${HOSTNAME:-$(hostname)}"
    mkdir -p "$dir"
    # A stale ticket of this node would lead others to an address that is gone.
    rm -f "$dir/$me.ticket"
    export SHOAL_TICKET_FILE="${SHOAL_TICKET_FILE:-$dir/$me.ticket}"
    want="${BOOTSTRAP_PEERS:-0}"
    waited=0
    while :; do
        tickets=""
        n=0
        for f in "$dir"/*.ticket; do
            [ -s "$f" ] || continue
            [ "$f" = "$dir/$me.ticket" ] && continue
            t="$(tr -d ' \n' <"$f")"
            tickets="${tickets:+$tickets,}$t"
            n=$((n + 1))
        done
        [ "$n" -ge "$want" ] && break
        if [ "$waited" -ge "${BOOTSTRAP_WAIT:-120}" ]; then
            echo "shoal-entrypoint: found $n of $want peer tickets in $dir after ${waited}s" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    if [ -z "${SHOAL_JOIN:-}" ] && [ -n "$tickets" ]; then
        export SHOAL_JOIN="$tickets"
    fi
fi
exec shoal "$@"
