#!/usr/bin/env bash
# Installs FerretDB v1.24.2 (the MongoDB-protocol server used for development and tests), with
# our _id-index patch, into var/bin/ferretdb, unless the binary there was built from this very
# patch already. Prints progress on stderr and, as its last line on stdout, the binary's path
# (scripts/devdb.py reads that line).
#
# `go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2` builds, but the binary panics at
# start-up: the published module lacks build/version/version.txt, which FerretDB embeds and
# requires. So we fetch the same module through the Go module proxy, add that one file with the
# release's version, apply scripts/ferretdb-v1.24.2-id-index.patch (without it every lookup by
# _id scans the whole collection; the patch file says why and what it changes) and `go build`.
#
# var/bin/ferretdb.stamp records the version and the sha256 of the patch file the binary was
# built from. A binary without a stamp, or with another one (an unpatched build from before the
# patch, a CI cache), is rebuilt. Force a rebuild: rm var/bin/ferretdb.stamp (or var/bin/ferretdb).
#
# A ferretdb on PATH is not used: it would lack the patch. To use another binary anyway (one you
# built with the patch yourself), set RXLEDGER_FERRETDB to its path; it is used as it is.
set -euo pipefail

VERSION="v1.24.2"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/var/bin/ferretdb"
stampfile="$bin.stamp"
patchfile="$root/scripts/ferretdb-$VERSION-id-index.patch"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  cat <<EOF
usage: scripts/install-ferretdb.sh

Builds FerretDB $VERSION with scripts/$(basename "$patchfile") into var/bin/ferretdb
(needs Go) unless var/bin/ferretdb.stamp says it is built from that patch already, then prints
the binary's path. Force a rebuild: rm var/bin/ferretdb.stamp.

RXLEDGER_FERRETDB=/path/to/ferretdb   use that binary as it is (it should carry the patch)
EOF
  exit 0
fi

if [[ -n "${RXLEDGER_FERRETDB:-}" ]]; then
  if [[ ! -x "$RXLEDGER_FERRETDB" ]]; then
    echo "install-ferretdb: RXLEDGER_FERRETDB=$RXLEDGER_FERRETDB is not an executable file" >&2
    exit 1
  fi
  echo "install-ferretdb: using RXLEDGER_FERRETDB=$RXLEDGER_FERRETDB as it is (not checked for the _id-index patch)" >&2
  echo "$RXLEDGER_FERRETDB"
  exit 0
fi

if [[ ! -r "$patchfile" ]]; then
  echo "install-ferretdb: $patchfile is missing" >&2
  exit 1
fi
stamp="$VERSION $(sha256sum "$patchfile" | cut -d' ' -f1)"

if [[ -x "$bin" && -r "$stampfile" && "$(cat "$stampfile")" == "$stamp" ]]; then
  echo "$bin"
  exit 0
fi
if [[ -x "$bin" ]]; then
  echo "install-ferretdb: $bin was not built from the current $(basename "$patchfile") (stamp missing or different); rebuilding" >&2
fi
if ! command -v go >/dev/null 2>&1; then
  echo "install-ferretdb: Go is not installed; install Go >= 1.22, or set MONGODB_URI to a running MongoDB" >&2
  exit 1
fi
if command -v patch >/dev/null 2>&1; then
  apply=(patch -p1 --forward --batch --silent)
elif command -v git >/dev/null 2>&1; then
  # GIT_CEILING_DIRECTORIES: the source is under this repository's var/; without it, git apply
  # would take paths relative to this repository's root instead of the source's.
  apply=(env GIT_CEILING_DIRECTORIES="$root/var/build" git apply -p1)
else
  echo "install-ferretdb: neither patch nor git is installed; one is needed to apply $(basename "$patchfile")" >&2
  exit 1
fi

echo "install-ferretdb: building FerretDB $VERSION with $(basename "$patchfile") (takes a few minutes)..." >&2
moddir="$(go mod download -json "github.com/FerretDB/FerretDB@$VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
# Own directories and file names, so that two sessions rebuilding at once do not collide.
mkdir -p "$root/var/build" "$root/var/bin"
src="$(mktemp -d "$root/var/build/ferretdb-$VERSION.XXXXXX")"
trap 'rm -rf "$src" "$bin.tmp.$$"' EXIT
cp -r "$moddir/." "$src"
chmod -R u+w "$src"
echo "$VERSION" > "$src/build/version/version.txt"
if ! (cd "$src" && "${apply[@]}" < "$patchfile" >&2); then
  echo "install-ferretdb: $(basename "$patchfile") does not apply to FerretDB $VERSION's module source" >&2
  exit 1
fi
(cd "$src" && CGO_ENABLED=0 go build -trimpath -o "$bin.tmp.$$" ./cmd/ferretdb)
rm -f "$stampfile"
mv "$bin.tmp.$$" "$bin"
echo "$stamp" > "$stampfile"
echo "install-ferretdb: installed $("$bin" --version 2>&1 | head -1), patched ($stamp)" >&2
echo "$bin"
