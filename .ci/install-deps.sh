#!/usr/bin/env bash
# Install everything spinfs's test suite and benchmarks need on a fresh Debian 12 machine.
# Idempotent and non-interactive; run as root. Safe to run on every CI start: packages that are
# already present are left alone and the pinned cargo tools are rebuilt only when missing or at
# another version.
# Measured (2 shared cores, 2026-11-28): apt part on a fresh Debian 12 minbase chroot 1m24s
# (238 MB fetched); cargo part with an empty cargo home 2m28s; re-run with everything present
# 0.2s.
set -euo pipefail

# Pinned tool versions (bump deliberately: expected-failure lists depend on them).
PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2

export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root (apt-get, modprobe, /dev/fuse)" >&2
    exit 1
fi

# Debian packages. Runtime: fuse3 (fusermount3, /etc/fuse.conf), erofs-utils (mkfs/fsck.erofs),
# fio (benchmarks), attr/acl (getfattr/setfacl; acl also for pjdfstest), ffmpeg (ffprobe), file,
# strace (what sniffers read, in the video tests), libglib2.0-bin (gio, a file manager's sniff),
# kmod (modprobe), mount + util-linux (mount, findmnt, mountpoint, losetup), procps, python3
# (runner helpers), time (/usr/bin/time), e2fsprogs (mkfs.ext4 for the power-loss test's
# simulated disk).
# Build: build-essential + pkg-config for the cargo tools, libacl1-dev (pjdfstest links libacl
# through the exacl crate), ca-certificates for crates.io over TLS.
APT_PACKAGES=(
    fuse3 erofs-utils fio attr acl libacl1-dev ffmpeg file strace libglib2.0-bin
    build-essential pkg-config ca-certificates
    kmod mount util-linux procps python3 time e2fsprogs
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 update -q
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
else
    echo "install-deps: Debian packages already present"
fi

# Kernel modules the tests mount with (built in on some kernels: ignore modprobe failures, the
# checks below say what is really missing).
for m in fuse overlay erofs loop; do
    modprobe "$m" 2>/dev/null || true
done
[ -e /dev/fuse ] || echo "install-deps: WARNING: /dev/fuse missing; FUSE mounts will fail" >&2
grep -qw overlay /proc/filesystems || echo "install-deps: WARNING: no overlayfs in kernel" >&2
grep -qw erofs /proc/filesystems || echo "install-deps: WARNING: no erofs in kernel" >&2

# Rust toolchain: the machine image ships rustup's cargo; a machine without it gets a minimal
# stable toolchain through rustup if rustup is present.
if [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
        rustup toolchain install stable --profile minimal
    else
        echo "install-deps: cargo not found and no rustup to install it" >&2
        exit 1
    fi
fi

# pjdfstest refuses to switch to dummy users that do not exist; Debian has nobody/nogroup and
# daemon/daemon in its base passwd, which is what tests/pjdfstest/pjdfstest.toml uses.
for ug in nobody:nogroup daemon:daemon; do
    if ! getent passwd "${ug%%:*}" >/dev/null || ! getent group "${ug##*:}" >/dev/null; then
        echo "install-deps: user/group $ug missing (needed by tests/pjdfstest/pjdfstest.toml)" >&2
        exit 1
    fi
done

# cargo_tool CRATE VERSION BINARY: install a pinned crate unless that exact version is present.
cargo_tool() {
    local crate=$1 version=$2 bin=$3
    if cargo install --list 2>/dev/null | grep -qx "$crate v$version:" \
        && command -v "$bin" >/dev/null 2>&1; then
        echo "install-deps: $crate $version already installed"
        return
    fi
    echo "install-deps: cargo install --locked $crate@$version"
    cargo install --locked --force --version "=$version" "$crate"
}
cargo_tool pjdfstest "$PJDFSTEST_VERSION" pjdfstest
cargo_tool fsx "$FSX_VERSION" fsx

echo "install-deps: done"
