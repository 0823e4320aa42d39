#!/usr/bin/env bash
# Quick start: install what is missing, fetch assets, build, and run `capibara dev`
# (Postgres + Redis under ./.capibara, migrations, api + worker + scheduler in one process,
# a demo key printed). Safe to re-run. Extra arguments go to `capibara dev`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash deploy/install-deps.sh
bash deploy/fetch-assets.sh || echo "dev.sh: assets skipped" >&2
cargo build --release --bins
exec target/release/capibara dev "$@"
