#!/bin/bash
# The container's health check: GET /health on this node's API (127.0.0.1, the port of
# SHOAL_API or SHOAL_LISTEN, else 8000) with bash's /dev/tcp, no curl needed. Exit 0 on
# HTTP 200 (the node's view of the swarm covers every layer), 1 otherwise.
set -u
addr="${SHOAL_HEALTH_ADDR:-}"
if [ -z "$addr" ]; then
    for a in "${SHOAL_API:-}" "${SHOAL_LISTEN:-}" "127.0.0.1:8000"; do
        [ -n "$a" ] && { addr="$a"; break; }
    done
fi
port="${addr##*:}"
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
read -r status_line <&3 || exit 1
exec 3<&-
case "$status_line" in
    "HTTP/1."?" 200"*) exit 0 ;;
    *) echo "unhealthy: $status_line" >&2; exit 1 ;;
esac
