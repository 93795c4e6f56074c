#!/usr/bin/env bash
# mypy over the packages as they import (tensorps.client lives in client/, etc.): the editable install's
# import hook is invisible to mypy, so this links the source folders into a tensorps/ tree it can read.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree"
mkdir -p "$tree/tensorps"
root=$(pwd)
ln -s "$root/protos/tensorps/__init__.py" "$root/protos/tensorps/py.typed" "$tree/tensorps/"
ln -s "$root/protos/tensorps/v1" "$tree/tensorps/v1"
for pkg in client server examples cli; do
  [ -d "$pkg" ] && ln -s "$root/$pkg" "$tree/tensorps/$pkg"
done
targets=("$tree/tensorps" tests)
[ -d bench ] && targets+=(bench)
MYPYPATH="$tree:tests" "${MYPY:-mypy}" "${targets[@]}"
