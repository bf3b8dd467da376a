#!/usr/bin/env bash
# Runs every switchyard test on a fresh machine:
#   1. makes sure RabbitMQ is installed, running and answering (installs
#      rabbitmq-server with apt-get if missing, starts it detached);
#   2. checks formatting and clippy (-D warnings);
#   3. starts a three-node RabbitMQ cluster next to it, and a node that
#      requires client certificates (scripts/cluster.sh up / tls-up, torn
#      down on exit) for the failover and mutual-TLS tests;
#   4. runs the whole workspace's tests with every transport enabled (the
#      wire tests also need python3 with aiormq/pamqp, installed with pip
#      when missing).
# Broker tests fail (not skip) when the broker is unreachable, because this
# script sets SWITCHYARD_REQUIRE_RABBITMQ=1.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

ensure_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        log "installing rabbitmq-server"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq rabbitmq-server
    fi
    if ! rabbitmqctl -q status >/dev/null 2>&1; then
        log "starting rabbitmq-server"
        rabbitmq-server -detached || true
    fi
    # Wait until the node runs and the application is up (it may have been
    # left with the app stopped), then until the AMQP port answers.
    local deadline=$((SECONDS + 120))
    until rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "RabbitMQ did not start within 120 s" >&2
            return 1
        fi
        rabbitmqctl -q start_app >/dev/null 2>&1 || rabbitmq-server -detached >/dev/null 2>&1 || true
        sleep 2
    done
    until (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "RabbitMQ port 5672 did not open within 120 s" >&2
            return 1
        fi
        sleep 1
    done
    log "RabbitMQ is up ($(rabbitmqctl -q version 2>/dev/null || echo unknown version))"
}

ensure_python_peer() {
    # The wire tests use a peer that is not switchyard: aiormq/pamqp.
    if ! python3 -c "import aiormq, pamqp" >/dev/null 2>&1; then
        log "installing the Python AMQP peer (aiormq, pamqp)"
        python3 -m pip install -q aiormq pamqp
    fi
}

ensure_management() {
    # The CLI's queues / topology diff / export read the management API.
    if ! rabbitmq-plugins -q list -e 2>/dev/null | grep -q "rabbitmq_management "; then
        log "enabling the management plugin"
        rabbitmq-plugins -q enable rabbitmq_management >/dev/null
    fi
    # The conformance suite's x-consistent-hash scenario needs the plugin
    # shipped with RabbitMQ.
    if ! rabbitmq-plugins -q list -e 2>/dev/null | grep -q "rabbitmq_consistent_hash_exchange "; then
        log "enabling the consistent-hash exchange plugin"
        rabbitmq-plugins -q enable rabbitmq_consistent_hash_exchange >/dev/null
    fi
    local deadline=$((SECONDS + 60))
    until (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "the management API (port 15672) did not open within 60 s" >&2
            return 1
        fi
        sleep 1
    done
}

ensure_rabbitmq
ensure_management
ensure_python_peer
export SWITCHYARD_REQUIRE_RABBITMQ=1

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "starting the three-node test cluster (scripts/cluster.sh, next to the broker on 5672)"
scripts/cluster.sh down >/dev/null 2>&1 || true
trap 'scripts/cluster.sh down >/dev/null 2>&1 || true' EXIT
scripts/cluster.sh up
scripts/cluster.sh tls-up

log "cargo test (workspace, all features)"
cargo test --workspace --all-features

log "the contextiq example on the memory transport, then on RabbitMQ through lapin and amqprs"
cargo run --quiet --example contextiq
cargo run --quiet --features lapin --example contextiq -- --transport lapin
cargo run --quiet --features amqprs --example contextiq -- --transport amqprs
