#!/usr/bin/env bash
# Installs FerretDB v1.24.2 (the MongoDB-protocol server used for development and tests) into
# var/bin/ferretdb, unless it is already there or on PATH.
#
# `go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2` builds, but the binary panics at
# start-up: the published module lacks build/version/version.txt, which FerretDB embeds and
# requires. So we fetch the same module through the Go module proxy, add that one file with the
# release's version, and `go build` it. Nothing else in the source is touched.
set -euo pipefail

VERSION="v1.24.2"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/var/bin/ferretdb"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  echo "usage: scripts/install-ferretdb.sh    install FerretDB $VERSION into var/bin (needs Go)"
  exit 0
fi

if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi
if command -v ferretdb >/dev/null 2>&1 && ferretdb --version >/dev/null 2>&1; then
  command -v ferretdb
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "install-ferretdb: Go is not installed; install Go >= 1.22, or set MONGODB_URI to a running MongoDB" >&2
  exit 1
fi

echo "install-ferretdb: building FerretDB $VERSION (first run only, takes a few minutes)..." >&2
moddir="$(go mod download -json "github.com/FerretDB/FerretDB@$VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
src="$root/var/build/ferretdb-$VERSION"
rm -rf "$src"
mkdir -p "$(dirname "$src")" "$root/var/bin"
cp -r "$moddir" "$src"
chmod -R u+w "$src"
echo "$VERSION" > "$src/build/version/version.txt"
(cd "$src" && CGO_ENABLED=0 go build -trimpath -o "$bin.tmp" ./cmd/ferretdb)
mv "$bin.tmp" "$bin"
rm -rf "$src"
echo "install-ferretdb: installed $("$bin" --version 2>&1 | head -1)" >&2
echo "$bin"
