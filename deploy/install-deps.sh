#!/usr/bin/env bash
# Installs what building and testing Capibara needs on Debian/Ubuntu: PostgreSQL, Redis,
# espeak-ng (TTS executor), build tools, and Node.js (the TypeScript SDK's tests), and the tools
# the deployment tests run on deploy/ (Prometheus, docker-compose, kubectl, systemd-analyze).
# Idempotent: apt is not touched when everything is already there. Docker is never needed.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }

# What is missing, and the Debian packages that provide it: apt installs only those, so a
# machine whose Node.js comes from elsewhere (NodeSource's nodejs bundles npm and conflicts with
# Debian's npm package) is not asked to replace it.
missing=()
packages=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
need() { missing+=("$1"); shift; packages+=("$@"); }

# The PostgreSQL server lives outside PATH on Debian.
have_postgres=false
for bin in /usr/lib/postgresql/*/bin/postgres; do
    [[ -x "$bin" ]] && have_postgres=true
done
$have_postgres || need "postgres (/usr/lib/postgresql/*/bin/postgres)" postgresql
have_cmd psql || need psql postgresql-client
have_cmd redis-server || need redis-server redis-server
have_cmd espeak-ng || need espeak-ng espeak-ng
[[ -f /usr/include/espeak-ng/speak_lib.h ]] || need "libespeak-ng-dev headers" libespeak-ng-dev
have_cmd pkg-config || need pkg-config pkg-config
have_cmd curl || need curl curl
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || need ca-certificates ca-certificates
# Assets come from PyPI wheels (pip), and the S3 test server runs in a venv.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need "python3-venv python3-pip" python3-venv python3-pip
# The SDKs' tests (sdk/typescript runs on Node >= 18; Debian 12 ships 18).
have_cmd node || need nodejs nodejs
have_cmd npm || need npm npm
# The dashboard's browser test drives Debian's chromium headless (tests/browser/dashboard.mjs).
[[ -x /usr/bin/chromium ]] || need chromium chromium

# The deployment tests (tests/tests/e2e/deploy): promtool and prometheus check and run
# deploy/prometheus, docker-compose 1.29 resolves deploy/docker-compose.yml (`config` needs no
# Docker daemon), `kubectl kustomize` renders deploy/k8s, systemd-analyze verifies
# deploy/systemd. Any kubectl will do (Debian 12's kubernetes-client is 1.20).
deploy_missing=()
{ have_cmd promtool && have_cmd prometheus; } || deploy_missing+=(prometheus)
have_cmd docker-compose || deploy_missing+=(docker-compose)
have_cmd kubectl || deploy_missing+=(kubernetes-client)
have_cmd systemd-analyze || deploy_missing+=(systemd)

sudo=()
need_apt() {
    if ! have_cmd apt-get; then
        log "error: apt-get not found; install the packages postgresql redis-server espeak-ng" \
            "libespeak-ng-dev curl ca-certificates pkg-config nodejs npm chromium prometheus docker-compose" \
            "kubernetes-client systemd with your package manager"
        exit 1
    fi
    if [[ $(id -u) -ne 0 ]]; then
        if have_cmd sudo; then
            sudo=(sudo)
        else
            log "error: not root and sudo not found; run this script as root"
            exit 1
        fi
    fi
}

if ((${#missing[@]} > 0)); then
    log "missing: ${missing[*]}"
    need_apt
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
else
    log "system packages present (postgres, psql, redis-server, espeak-ng, build tools)"
fi

if ((${#deploy_missing[@]} > 0)); then
    log "missing deployment tools: ${deploy_missing[*]}"
    need_apt
    ((${#missing[@]} > 0)) || "${sudo[@]}" apt-get update
    # The prometheus package would start a server on :9090: a policy-rc.d that refuses every
    # start keeps it (and anything else installed here) stopped; the tests start their own
    # Prometheus on a free port. An existing policy-rc.d is left as it is.
    held=false
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo[@]}" chmod 755 /usr/sbin/policy-rc.d
        held=true
    fi
    rc=0
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${deploy_missing[@]}" || rc=$?
    ! $held || "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || exit "$rc"
    # Nor is it started at the next boot.
    if [[ " ${deploy_missing[*]} " == *" prometheus "* && -d /run/systemd/system ]]; then
        "${sudo[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
else
    log "deployment tools present (promtool, prometheus, docker-compose, kubectl, systemd-analyze)"
fi

if ! have_cmd cargo; then
    log "error: cargo not found; install a Rust toolchain with rustup (https://rustup.rs)," \
        "then open a new shell or run: source \"\$HOME/.cargo/env\""
    exit 1
fi

if ! have_cmd cargo-nextest && ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
