#!/usr/bin/env bash
# No-op jobs/s: Eventra's Redis queue + worker actors vs raw Redis vs Sidekiq, on the
# same Redis, in one invocation. Installs Debian's ruby-sidekiq when it is missing.
# Usage: bench/jobs.sh [extra `eventra bench jobs` flags, e.g. --jobs 50000 --batch 1]
set -euo pipefail
cd "$(dirname "$0")/.."
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
if ! ruby -e 'require "sidekiq"' 2>/dev/null; then
  echo "installing ruby-sidekiq (Debian) ..." >&2
  apt-get install -y ruby-sidekiq >/dev/null
fi
cargo build --release --quiet
target="${CARGO_TARGET_DIR:-target}"
echo "# $(date -u +%F) on $(nproc) cores; Redis $(redis-cli -u "$REDIS_URL" info server | grep -o 'redis_version:[0-9.]*' | cut -d: -f2)"
EVENTRA_LOG=warn "$target/release/eventra" bench jobs "$@"
