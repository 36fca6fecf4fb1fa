#!/usr/bin/env bash
# Sets up everything on a fresh machine and mounts a spinfs store:
# installs the system packages spinfs needs, builds in release mode, creates a store in
# ./spinfs-data (embedded defaults: SSD tree and a dir: medium inside it) and mounts it on
# ./mnt. Run as root from the repository root. Unmount with: target/release/spinfs umount mnt
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v fusermount3 >/dev/null || ! command -v mkfs.erofs >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 erofs-utils attr acl >/dev/null
fi
modprobe fuse 2>/dev/null || true
cargo build --release --locked -p spinfs
bin=target/release/spinfs
if [ ! -e spinfs-data/spinfs.toml ]; then
    "$bin" mkfs spinfs-data
fi
mkdir -p mnt
if grep -q " $(pwd)/mnt fuse" /proc/mounts; then
    echo "already mounted on $(pwd)/mnt"
else
    "$bin" mount spinfs-data mnt
    echo "spinfs-data is mounted on $(pwd)/mnt"
fi
"$bin" status spinfs-data
