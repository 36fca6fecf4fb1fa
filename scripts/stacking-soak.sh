#!/usr/bin/env bash
# Soak file stacking at full size (CI runs the same tests scaled down):
#   1. fsx on a stacked file (files open for writing served by the daemon, so the fsx file is
#      archived at every seal and goes on stacked) with seals and merges every ~150 ms:
#      FSX_OPS operations (default 1000000; ~3.7 ms each here, so about an hour);
#   2. a 5 GiB file written through one descriptor with a 1 GiB archive threshold on a 4 GiB
#      loop-mounted ext4 SSD: it must span at least 5 images and read back byte-identical
#      after a remount (CI: 1 GiB, 64 MiB threshold, 300 MiB SSD);
#   3. a 4 KiB overwrite in the middle of a 2 GiB archived file copies up one chunk (the CI
#      size; SOAK_BIG_MIB to change it).
# usage: scripts/stacking-soak.sh   (root, /dev/fuse; needs ~12 GiB free under /var/tmp/spt)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
ops=${FSX_OPS:-1000000}
echo "stacking-soak: fsx $ops operations on a stacked file with seals and merges"
SPINFS_FSX_STACK_OPS=$ops cargo nextest run --release -p spinfs --test conformance \
    fsx_on_a_stacked_file_with_seals_and_merges_mid_run --no-capture
echo "stacking-soak: a 5 GiB file, 1 GiB threshold, 4 GiB SSD"
SPINFS_STACK_SSD_MIB=4096 SPINFS_STACK_FILE_MIB=5120 SPINFS_STACK_THRESHOLD_MIB=1024 \
    cargo nextest run --release -p spinfs --test stacking \
    a_file_larger_than_the_ssd_is_written_through_one_descriptor --no-capture
echo "stacking-soak: 4 KiB overwrite in a ${SOAK_BIG_MIB:-2048} MiB archived file"
SPINFS_STACK_BIG_MIB=${SOAK_BIG_MIB:-2048} cargo nextest run --release -p spinfs \
    --test stacking overwrite_in_a_large_archived_file_copies_one_chunk --no-capture
echo "stacking-soak: all passed"
