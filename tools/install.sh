#!/usr/bin/env bash
# Shared by tools/test.sh and the README's commands: install pvio and what it talks to.
# Debian packages are the real peers pvio is tested against (Xen's headers and XenStore
# clients, QEMU's and libnbd's NBD clients, fio, the kernel's tools); Python packages go
# into a virtual environment at .venv so the system Python is left alone.
set -euo pipefail

VENV="${PVIO_VENV:-$PWD/.venv}"

# gcc + libxen-dev: the C layout probe and C ring/blkif peers (gcc-multilib for -m32);
# libatomic1: pvio.ring's memory fences and the hypervisor's compare-and-swap on shared
# grant entries (both through ctypes);
# xenstore-utils, python3-pyxs: Xen's own XenStore clients; qemu-utils, libnbd-bin,
# nbdfuse, fio: NBD clients; fuse3, e2fsprogs, util-linux: the kernel path (nbdfuse, loop,
# mkfs.ext4, e2fsck); iproute2, iperf3: namespaces, TAP and TCP for lguest's LAN;
# python3-dev: Python's headers, for the modules compiled with mypyc (tools/compile.py);
# make: builds native/, the /dev/xen device layer Xen's own programs run on (libxen-dev's
# libraries and libxenvchan are its test peers); qemu-system-xen: QEMU's qdisk backend,
# which pvio up runs for backendtype=qdisk disks; xen-utils-4.17: Xen's C xenstored and
# xenconsoled (`pvio up --xenstored xen`); xen-utils-common: Xen's hotplug scripts
# (/etc/xen/scripts/vif-bridge, which the driver domain runs for script=vif-bridge vifs).
DEBIAN_PACKAGES=(
  gcc gcc-multilib libc6-dev libxen-dev python3-venv python3-dev make qemu-system-xen xen-utils-4.17
  xen-utils-common
  libatomic1
  xenstore-utils python3-pyxs
  # nbdfuse ships in libnbd-bin: Debian 12 has it only as a virtual package, which
  # dpkg-query never reports installed (apt-get would run on every call).
  qemu-utils libnbd-bin fio
  # openssl makes the TLS test certificates (tests/nbd/tlscerts.py)
  openssl
  fuse3 e2fsprogs util-linux
  iproute2 iperf3 iputils-ping
)

step() { printf '\n==> %s\n' "$*"; }

install_debian_packages() {
  local missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

install_python_env() {
  local extra="${1:-}"
  if [ ! -x "$VENV/bin/python" ]; then
    step "python3 -m venv $VENV"
    python3 -m venv "$VENV"
  fi
  step "pip install -e .${extra:+[$extra]}"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".${extra:+[$extra]}"
}

# native/: the /dev/xen device layer (libpvio-xen.so) and its ASan/UBSan build.
build_native() {
  step "make -C native"
  make -s -C "$(dirname "${BASH_SOURCE[0]}")/../native" all asan
}

# The block path's hottest modules compiled with mypyc (pvio/compiled.py): used while they
# match their sources, so this runs again after every change to one of them.
build_compiled() {
  step "tools/compile.py (mypyc)"
  "$VENV/bin/python" "$(dirname "${BASH_SOURCE[0]}")/compile.py" 2>&1 | grep -v "warning: Treating generator"
}

# Run directly (as the README's first command does): install everything.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  install_debian_packages
  install_python_env compile
  build_native
  build_compiled
  step "pvio is installed: $VENV/bin/pvio"
fi
