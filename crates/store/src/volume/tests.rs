//! Interleavings of operations with a freeze that only a hook inside `freeze` can force.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::time::Duration;

fn caller() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: 1,
    }
}

fn freeze(vol: &Volume, root: &Path) {
    let tree = root.join("gens/2/tree");
    std::fs::create_dir_all(&tree).unwrap();
    vol.freeze(2, &tree, &root.join("gens/2/work")).unwrap();
}

fn read_all(vol: &Volume, fh: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < len {
        let got = vol
            .read(fh, out.len() as u64, (len - out.len()) as u32)
            .unwrap();
        if got.is_empty() {
            break;
        }
        out.extend(got);
    }
    out
}

/// Creates `/f` with open flags `flags` (`daemon_io`: served by the daemon): (its number,
/// the handle).
fn create_f(vol: &Volume, flags: i32, daemon_io: bool) -> (u64, u64) {
    let (attr, fh, _) = vol
        .create(
            ROOT_INO,
            OsStr::new("f"),
            0o644,
            0o022,
            flags,
            &caller(),
            daemon_io,
        )
        .unwrap();
    (attr.ino, fh)
}

/// Writes all of `data` at offset 0 of handle `fh`.
fn write_all(vol: &Volume, fh: u64, data: &[u8]) {
    let mut at = 0;
    while at < data.len() {
        at += vol.write(fh, at as u64, &data[at..], false).unwrap();
    }
}

/// A store on the disk (scratch directory `prefix...` under /var/tmp) whose sealed trees are
/// drained in 1 MiB steps without rests, and a volume over it.
fn draining_store(prefix: &str) -> (tempfile::TempDir, crate::Store, Volume) {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut config = crate::StoreConfig::default();
    config.media_io.tree_delete_step = 1 << 20;
    config.media_io.tree_delete_rest = 0;
    let (store, vol) = store_and_volume(tmp.path(), config);
    (tmp, store, vol)
}

/// A store made with `config` under `dir`, and a volume over its writable generation.
fn store_and_volume(dir: &Path, config: crate::StoreConfig) -> (crate::Store, Volume) {
    let root = dir.join("store");
    crate::Store::create(&root, config).unwrap();
    let mut store = crate::Store::open(&root).unwrap();
    let layout = store.layout().clone();
    let g = store.manifest().upper_gen;
    let vol = Volume::new(
        &layout.generation_tree(g),
        &layout.generation_work(g),
        g,
        store.open_layers().unwrap(),
    )
    .unwrap();
    (store, vol)
}

/// A daemon-served file is written between the freeze's stack swap and its carry-over (its
/// writes still land in the frozen tree then, and the carry takes them along) while another
/// thread looks its name up. The lookup must not see, nor cache for the carry, the frozen
/// file as it was before that write: the 1M-operation fsx soak once got EIO ("the lower file
/// of a stacked file is missing or changed") after a carry built the new tree's stacked copy
/// from a size cached by such a lookup, and the bytes written in the window were cut off.
#[test]
fn a_lookup_while_a_freeze_carries_a_file_over_does_not_cache_its_old_size() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let tree = root.join("gens/1/tree");
    std::fs::create_dir_all(&tree).unwrap();
    let vol = Arc::new(Volume::new(&tree, &root.join("gens/1/work"), 1, Vec::new()).unwrap());
    let (ino, fh) = create_f(&vol, libc::O_WRONLY, true);
    assert_eq!(vol.write(fh, 0, &[b'a'; 4096], false).unwrap(), 4096);

    let (tx, rx) = mpsc::channel();
    let weak = Arc::downgrade(&vol);
    *vol.after_swap_hook.lock().unwrap() = Some(Box::new(move || {
        let vol = weak.upgrade().unwrap();
        let looker = vol.clone();
        let lookup = std::thread::spawn(move || looker.lookup(ROOT_INO, OsStr::new("f")));
        // Time for the lookup to resolve the name now, if it does not wait for the freeze.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(vol.write(fh, 4096, &[b'b'; 4096], false).unwrap(), 4096);
        tx.send(lookup).unwrap();
    }));
    freeze(&vol, root);
    *vol.after_swap_hook.lock().unwrap() = None;

    let looked = rx.recv().unwrap().join().unwrap().unwrap();
    assert_eq!(looked.ino, ino);
    assert_eq!(
        looked.size, 8192,
        "the lookup saw the file before the carry"
    );
    assert_eq!(vol.getattr(ino, None).unwrap().size, 8192);
    // Through the handle open across the freeze, and through a new one.
    let want: Vec<u8> = [[b'a'; 4096], [b'b'; 4096]].concat();
    assert_eq!(vol.getattr(ino, Some(fh)).unwrap().size, 8192);
    assert!(
        read_all(&vol, fh, 8192) == want,
        "read through the old handle"
    );
    let (fh2, _) = vol.open(ino, libc::O_RDONLY, true).unwrap();
    assert!(
        read_all(&vol, fh2, 8192) == want,
        "read through a new handle"
    );
    vol.release(fh2);
    vol.release(fh);
}

/// Freezes the writable generation of `store`/`vol` and seals it into a layer (not yet
/// swapped into the volume): returns the frozen generation and its opened layer.
fn freeze_and_seal(
    store: &mut crate::Store,
    vol: &Volume,
) -> (u64, Arc<crate::archive::ArchivedLayer>) {
    let frozen = store.freeze().unwrap();
    let new_gen = store.manifest().upper_gen;
    let layout = store.layout().clone();
    vol.freeze(
        new_gen,
        &layout.generation_tree(new_gen),
        &layout.generation_work(new_gen),
    )
    .unwrap();
    let rec = store.seal_frozen(frozen.clone()).unwrap().expect("a layer");
    (frozen.generation, store.open_layer(rec.id).unwrap())
}

/// As the archiver ends a seal: the layer swapped in, the frozen tree deleted.
fn swap_and_drop(
    store: &crate::Store,
    vol: &Volume,
    generation: u64,
    layer: Arc<crate::archive::ArchivedLayer>,
) {
    vol.sealed(generation, Some(layer)).unwrap();
    let unused = vol.sealed_tree_unused(generation, Duration::from_millis(50));
    store
        .drop_generation(generation, unused, &|| false)
        .unwrap();
    vol.generation_dropped();
}

/// A read of a stacked file whose lower file is in the frozen generation races the end of
/// that generation's seal: the stack the read took still has the frozen tree, which is
/// deleted (after its layer was swapped in) before the read looks the lower file up in it.
/// The lookup then fell through to an older archived version of the file, of another size,
/// and the read failed with EIO ("the lower file of a stacked file is missing or changed",
/// seen twice in 1M-operation fsx soaks). It must find the file in the new layer instead.
#[test]
fn a_stacked_read_racing_the_deletion_of_a_sealed_tree_reads_the_new_layer() {
    let tmp = tempfile::Builder::new()
        .prefix("race")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (mut store, vol) = store_and_volume(tmp.path(), crate::StoreConfig::default());
    let vol = Arc::new(vol);
    let (ino, fh) = create_f(&vol, libc::O_RDWR, true);
    let a: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let b: Vec<u8> = (0..1 << 20).map(|i| (i % 241) as u8 + 1).collect();
    assert_eq!(vol.write(fh, 0, &a, false).unwrap(), a.len());
    // Archived once (1 MiB in the first layer), then extended to 2 MiB in the next
    // generation, which is frozen: the file goes on as a stacked copy over that frozen one.
    let (g1, l1) = freeze_and_seal(&mut store, &vol);
    swap_and_drop(&store, &vol, g1, l1);
    assert_eq!(vol.write(fh, 1 << 20, &b, false).unwrap(), b.len());
    let (g2, l2) = freeze_and_seal(&mut store, &vol);

    let store = Arc::new(Mutex::new(store));
    let (s, v) = (store.clone(), Arc::downgrade(&vol));
    *vol.before_lower_resolve_hook.lock().unwrap() = Some(Box::new(move || {
        let vol = v.upgrade().unwrap();
        swap_and_drop(&s.lock().unwrap(), &vol, g2, l2);
    }));
    let want = [a, b].concat();
    assert!(
        read_all(&vol, fh, want.len()) == want,
        "read across the end of the seal"
    );
    assert!(
        vol.before_lower_resolve_hook.lock().unwrap().is_none(),
        "the read did not resolve the lower file"
    );
    assert_eq!(vol.getattr(ino, None).unwrap().size, 2 << 20);
    vol.release(fh);
}

/// A file of the frozen generation opened read-only (its handle reads the frozen tree's file
/// through an `O_PATH` descriptor, reopened at every read) is read on after the seal deleted
/// the tree. The deletion may punch out large files first (`crate::reclaim`), which a write
/// lease allows whenever no read is in progress: the volume must say the tree is still held,
/// or the handle would read holes.
#[test]
fn a_handle_on_the_frozen_tree_reads_its_file_after_the_seal_deleted_it() {
    let (_tmp, mut store, vol) = draining_store("drain");
    let layout = store.layout().clone();
    let (ino, fh) = create_f(&vol, libc::O_WRONLY, false);
    let data: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8 + 1).collect();
    write_all(&vol, fh, &data);
    vol.fsync(fh, false).unwrap();
    vol.release(fh);
    // Frozen (the file not open: it stays in the frozen tree), then opened for reading.
    let frozen = store.freeze().unwrap();
    let new_gen = store.manifest().upper_gen;
    vol.freeze(
        new_gen,
        &layout.generation_tree(new_gen),
        &layout.generation_work(new_gen),
    )
    .unwrap();
    let (rfh, _) = vol.open(ino, libc::O_RDONLY, true).unwrap();
    assert_eq!(read_all(&vol, rfh, 4096), data[..4096]);
    let rec = store.seal_frozen(frozen.clone()).unwrap().expect("a layer");
    let layer = store.open_layer(rec.id).unwrap();
    vol.sealed(frozen.generation, Some(layer)).unwrap();
    let unused = vol.sealed_tree_unused(frozen.generation, Duration::from_millis(50));
    assert!(!unused, "a handle still reads the frozen tree");
    store
        .drop_generation(frozen.generation, unused, &|| false)
        .unwrap();
    vol.generation_dropped();
    assert!(
        read_all(&vol, rfh, data.len()) == data,
        "the handle read something else than the file after the seal"
    );
    vol.release(rfh);
}

/// The mount's syncs and the archiver's I/O meet in the store's `ForegroundSyncs`: an fsync
/// of the writable layer counts as under way while it runs, and a seal and the drain of its
/// tree that run while a sync is under way hold back each piece of their I/O (the seal's
/// direct reads of the frozen tree, its media writes, each punched step) for the longest
/// yield. Without the wiring, background I/O would go on beside the mount's syncs.
#[test]
fn seals_and_tree_deletions_yield_to_the_mounts_syncs() {
    let (_tmp, mut store, vol) = draining_store("yield");
    let syncs = store.foreground_syncs();
    vol.set_foreground_syncs(syncs.clone());
    let seen = Arc::new(AtomicUsize::new(usize::MAX));
    let (s, w) = (syncs.clone(), seen.clone());
    vol.set_sync_observer(Box::new(move |_| w.store(s.under_way(), Ordering::Relaxed)));
    let (_, fh) = create_f(&vol, libc::O_WRONLY, false);
    let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8 + 1).collect();
    write_all(&vol, fh, &data);
    vol.fsync(fh, false).unwrap();
    vol.release(fh);
    assert_eq!(seen.load(Ordering::Relaxed), 1, "the fsync was under way");
    assert_eq!(syncs.under_way(), 0, "and ended");
    assert_eq!(syncs.stats().yields, 0, "nothing yielded yet");

    // A sync that stays under way for the whole seal.
    let held = syncs.begin();
    let (generation, layer) = freeze_and_seal(&mut store, &vol);
    let sealed = syncs.stats();
    // 4 MiB read back in 256 KiB direct reads, written to the media in 256 KiB grants.
    assert!(sealed.yields >= 16 + 16, "{sealed:?}");
    assert!(
        sealed.yielded >= 32 * spinfs_media::fgsync::DEFAULT_MAX_YIELD,
        "{sealed:?}"
    );
    swap_and_drop(&store, &vol, generation, layer);
    let dropped = syncs.stats();
    // The 4 MiB file punched out in 1 MiB steps, each held back.
    assert!(
        dropped.yields >= sealed.yields + 4,
        "{sealed:?} {dropped:?}"
    );
    drop(held);
    let ino = vol.lookup(ROOT_INO, OsStr::new("f")).unwrap().ino;
    let (fh, _) = vol.open(ino, libc::O_RDONLY, true).unwrap();
    assert!(
        read_all(&vol, fh, data.len()) == data,
        "the file reads back from its layer"
    );
    vol.release(fh);
}
