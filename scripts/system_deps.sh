#!/usr/bin/env bash
# Debian packages some tests and the benchmark use: redis-server (benchmark peer), docker-compose
# (validates docker/compose.yaml), iproute2 (network-namespace test). Installed when running as root;
# otherwise the tests that need them skip and say why.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v ip >/dev/null || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: not installing ${missing[*]} (needs root and apt-get); the tests that use them will skip" >&2
  exit 0
fi
echo "installing ${missing[*]} with apt-get" >&2
# A failed install is not fatal: the tests that need these packages skip and say why.
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null; }; then
  echo "warning: could not install ${missing[*]}; the tests that use them will skip" >&2
fi
