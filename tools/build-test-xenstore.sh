#!/usr/bin/env bash
# Build Xen's own XenStore conformance client, test-xenstore
# (tools/tests/xenstore/test-xenstore.c), which Debian does not ship as a binary.
#
# The source comes from Debian's xen source package through apt itself (a private
# deb-src list made from the system's own entries, so its apt configuration is
# untouched); apt checks the tarball against the signed Sources index.  Only that one file and the header it includes are
# extracted, and it is compiled against libxenstore from libxen-dev.
#
#   bash tools/build-test-xenstore.sh [OUT_DIR]     # prints the binary's path
set -euo pipefail
OUT="${1:-${PVIO_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache}/test-xenstore}"
BIN="$OUT/test-xenstore"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$OUT/apt/lists/partial" "$OUT/apt/etc" "$OUT/apt/cache/archives/partial" "$OUT/src"
# The deb-src entries are the machine's own Debian entries (deb822 files in
# /etc/apt/sources.list.d/*.sources, or one-line /etc/apt/sources.list), with the type
# turned into deb-src: the same mirrors apt-get install already uses.
: > "$OUT/apt/etc/xen-src.sources"
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  awk 'BEGIN{RS=""; ORS="\n\n"} /(^|\n)Types:[^\n]*deb/ && /\/debian/ {sub(/Types:[^\n]*/, "Types: deb-src"); print}' \
    "$f" >> "$OUT/apt/etc/xen-src.sources"
done
if [ -f /etc/apt/sources.list ]; then
  grep -E '^deb [^#]*/debian' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "$OUT/apt/etc/xen-src.list" || true
fi
if [ ! -s "$OUT/apt/etc/xen-src.sources" ] && [ ! -s "$OUT/apt/etc/xen-src.list" ]; then
  echo "no Debian apt source found to fetch the xen source package from" >&2; exit 1
fi
APT=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$OUT/apt/etc"
     -o "Dir::State::Lists=$OUT/apt/lists" -o "Dir::Cache=$OUT/apt/cache"
     -o "APT::Sandbox::User=root" -q)
apt-get "${APT[@]}" update >&2
cd "$OUT/src"
got=""
# Newest first; a mirror may lack one version's files, so try each.
for v in $(apt-cache "${APT[@]}" showsrc xen | awk '/^Version:/{print $2}' | sort -rV); do
  if apt-get "${APT[@]}" source --download-only "xen=$v" >&2; then got="$v"; break; fi
done
[ -n "$got" ] || { echo "no xen source package could be downloaded" >&2; exit 1; }
tarball=$(ls xen_*.orig.tar.* | head -n1)
tar xf "$tarball" --wildcards '*/tools/tests/xenstore/test-xenstore.c' '*/tools/include/xen-tools/libs.h'
top=$(ls -d xen-*/ | head -n1)
gcc -O2 -Wall -I "$top/tools/include" -o "$BIN" "$top/tools/tests/xenstore/test-xenstore.c" -lxenstore >&2
echo "$got" > "$OUT/VERSION"
echo "$BIN"
