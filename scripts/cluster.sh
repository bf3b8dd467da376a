#!/usr/bin/env bash
# Three RabbitMQ nodes clustered on this machine, next to the RabbitMQ on 5672
# (which this script never touches):
#
#   scripts/cluster.sh up       start sy1, sy2, sy3 and join them into a cluster
#   scripts/cluster.sh down     stop them and remove their data
#   scripts/cluster.sh status   show the cluster as sy1 sees it
#   scripts/cluster.sh stop N   stop the node sy N (1-3), keeping its data
#   scripts/cluster.sh start N  start it again (it rejoins the cluster)
#   scripts/cluster.sh tls-up   start a fourth, standalone node sytls with an AMQPS
#                               listener on 127.0.0.1:5691 that requires a client
#                               certificate (mutual TLS); CA, server and client
#                               certificates are made with openssl under $BASE/tls
#   scripts/cluster.sh tls-down stop it and remove its data
#
# Nodes: sy1@localhost (AMQP 127.0.0.1:5681, distribution 25681), sy2 (5682,
# 25682), sy3 (5683, 25683); data under $SWITCHYARD_CLUSTER_DIR (default
# /tmp/switchyard-cluster), owned by the rabbitmq user, which shares the Erlang
# cookie with the main node. The address list for clients:
#   amqp://guest:guest@127.0.0.1:5681/,amqp://guest:guest@127.0.0.1:5682/,amqp://guest:guest@127.0.0.1:5683/
# (guest may connect over loopback only, as on the main node).
set -euo pipefail

BASE=${SWITCHYARD_CLUSTER_DIR:-/tmp/switchyard-cluster}
RMQ_BIN=/usr/lib/rabbitmq/bin

log() { printf '==> cluster: %s\n' "$*"; }

as_rabbitmq() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq "$@"
    else
        env HOME=/var/lib/rabbitmq "$@"
    fi
}

node_env() {
    local i=$1 dir="$BASE/sy$1" amqp="568$1" dist="2568$1"
    if [ "$i" = tls ]; then
        amqp=5690
        dist=25690
    fi
    echo RABBITMQ_NODENAME="sy$i@localhost" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$amqp" \
        RABBITMQ_DIST_PORT="$dist" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$dir/pid" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_ENABLED_PLUGINS="" \
        ERL_EPMD_ADDRESS=127.0.0.1
}

ctl() {
    local i=$1
    shift
    as_rabbitmq "$RMQ_BIN/rabbitmqctl" -n "sy$i@localhost" "$@"
}

start_node() {
    local i=$1 dir="$BASE/sy$1"
    mkdir -p "$dir/mnesia" "$dir/log"
    if [ ! -f "$dir/rabbitmq.conf" ] && [ "$i" != tls ]; then
        cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:568$i
management.tcp.port = 1568$i
vm_memory_high_watermark.relative = 0.2
EOF
        : >"$dir/enabled_plugins"
    fi
    chown -R rabbitmq:rabbitmq "$BASE" 2>/dev/null || true
    # From a directory the rabbitmq user can reach.
    (cd "$BASE" && as_rabbitmq $(node_env "$i") "$RMQ_BIN/rabbitmq-server" -detached) >/dev/null 2>&1
    # await_startup fails at once until epmd knows the node: retry it.
    local deadline=$((SECONDS + 90))
    until ctl "$i" await_startup --timeout 10 >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "node sy$i did not start within 90 s; its log: $dir/log" >&2
            return 1
        fi
        sleep 1
    done
}

stop_node() {
    local i=$1
    ctl "$i" stop >/dev/null 2>&1 || true
}

up() {
    mkdir -p "$BASE"
    chmod 755 "$BASE"
    for i in 1 2 3; do
        log "starting sy$i (AMQP 127.0.0.1:568$i)"
        start_node "$i"
    done
    for i in 2 3; do
        if ctl 1 cluster_status 2>/dev/null | grep -q "sy$i@localhost"; then
            continue
        fi
        log "joining sy$i to sy1"
        ctl "$i" stop_app >/dev/null
        ctl "$i" join_cluster sy1@localhost >/dev/null
        ctl "$i" start_app >/dev/null
    done
    log "up: $(ctl 1 cluster_status --formatter json 2>/dev/null | python3 -c 'import json,sys; print(", ".join(json.load(sys.stdin)["running_nodes"]))')"
}

down() {
    for i in tls 3 2 1; do
        stop_node "$i"
    done
    rm -rf "$BASE"
    log "down"
}

make_certs() {
    local d="$BASE/tls"
    [ -f "$d/client.key" ] && return 0
    mkdir -p "$d"
    (
        cd "$d"
        openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=switchyard test CA" \
            -keyout ca.key -out ca.pem 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
            -extfile server.ext -out server.pem 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=switchyard-client" -keyout client.key.rsa -out client.csr 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
            -extfile client.ext -out client.pem 2>/dev/null
        # PKCS#8, as both clients' TLS stacks read it.
        openssl pkcs8 -topk8 -nocrypt -in client.key.rsa -out client.key
    )
}

tls_up() {
    mkdir -p "$BASE/sytls"
    chmod 755 "$BASE"
    make_certs
    cat >"$BASE/sytls/rabbitmq.conf" <<CONF
listeners.tcp.local = 127.0.0.1:5690
listeners.ssl.1 = 127.0.0.1:5691
ssl_options.cacertfile = $BASE/tls/ca.pem
ssl_options.certfile = $BASE/tls/server.pem
ssl_options.keyfile = $BASE/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
management.tcp.port = 15690
vm_memory_high_watermark.relative = 0.2
CONF
    : >"$BASE/sytls/enabled_plugins"
    log "starting sytls (AMQPS 127.0.0.1:5691, client certificates required)"
    start_node tls
}

case "${1:-}" in
tls-up) tls_up ;;
tls-down)
    stop_node tls
    rm -rf "$BASE/sytls" "$BASE/tls"
    log "tls node down"
    ;;
up) up ;;
down) down ;;
status) ctl 1 cluster_status ;;
stop) stop_node "${2:?node number 1-3}"; log "sy$2 stopped" ;;
start) start_node "${2:?node number 1-3}"; log "sy$2 started" ;;
*)
    echo "usage: $0 up|down|status|stop N|start N" >&2
    exit 2
    ;;
esac
