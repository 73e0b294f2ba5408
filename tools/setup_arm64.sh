#!/usr/bin/env bash
# One-time setup for ARM64 edge verification under emulation (idempotent).
#
#   tools/setup_arm64.sh [CACHE_DIR]     (default: $BITPASS_ARM64_ROOT or ~/.cache/bitpass/arm64)
#
# Installs (root, Debian/Ubuntu): gcc-aarch64-linux-gnu (cross compiler) and qemu-user, then
# builds under CACHE_DIR a sysroot with an arm64 Python 3.11 (Debian packages unpacked with
# dpkg -x, no arm64 packages installed on the host) and the arm64 wheels of the TVM runtime
# (apache-tvm, apache-tvm-ffi, numpy, ml_dtypes) in CACHE_DIR/site. The TVM backend's
# emulation runner (bitpass.backends.tvm.emulate) looks there.
set -euo pipefail
ROOT="${1:-${BITPASS_ARM64_ROOT:-$HOME/.cache/bitpass/arm64}}"
SYSROOT="$ROOT/sysroot"
SITE="$ROOT/site"
PY="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$ROOT"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  echo "[setup_arm64] installing gcc-aarch64-linux-gnu and qemu-user"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null
fi

if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  echo "[setup_arm64] unpacking an arm64 Python 3.11 into $SYSROOT"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $SUDO dpkg --add-architecture arm64
    $SUDO apt-get update -qq
  fi
  DEBS="$ROOT/debs"; mkdir -p "$DEBS"
  PKGS="libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0
        libncursesw6 libtinfo6 libreadline8 libuuid1 libmpdec3 libcrypt1 libdb5.3 libgdbm6 libnsl2
        libtirpc3 libzstd1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2
        libkeyutils1 media-types
        python3.11-minimal libpython3.11-minimal libpython3.11-stdlib"
  ( cd "$DEBS" && for p in $PKGS; do
      case "$p" in media-types) q="$p" ;; *) q="$p:arm64" ;; esac
      apt-get -o APT::Sandbox::User=root download -qq "$q" 2>/dev/null || echo "[setup_arm64] (optional package $q not found)"
    done )
  mkdir -p "$SYSROOT"
  for d in "$DEBS"/*.deb; do dpkg -x "$d" "$SYSROOT"; done
  # ORT/TVM read /proc/cpuinfo; an ARM core's keeps libraries from parsing the x86 host's
  mkdir -p "$SYSROOT/proc"
  printf 'processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' > "$SYSROOT/proc/cpuinfo"
fi

if [ ! -f "$SITE/.complete" ]; then
  echo "[setup_arm64] installing arm64 wheels of the TVM runtime into $SITE"
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-compile --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux2014_aarch64 --only-binary=:all: --python-version 3.11 --implementation cp \
      --target "$SITE" apache-tvm==0.27.0.post1 numpy ml_dtypes typing_extensions
  touch "$SITE/.complete"
fi

echo "[setup_arm64] checking: import tvm under qemu-aarch64 (slow: ~15 s)"
QEMU_LD_PREFIX="$SYSROOT" PYTHONPATH="$SITE" PYTHONHOME="$SYSROOT/usr" \
  qemu-aarch64 -cpu neoverse-n1 -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -c \
  "import platform, tvm; print('[setup_arm64] ok:', platform.machine(), 'tvm', tvm.__version__)"
