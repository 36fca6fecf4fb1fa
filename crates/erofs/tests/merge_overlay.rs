//! Our merge against kernel overlayfs over the kernel-mounted layers (newest first).

mod common;

use common::Item::*;
use common::*;

fn data(tag: &str) -> Vec<u8> {
    let mut v = tag.as_bytes().to_vec();
    v.extend(pattern(5000 + tag.len() * 131, tag.len() as u64));
    v
}

fn names(snap: &std::collections::BTreeMap<String, Entry>, dir: &str) -> Vec<String> {
    let prefix = format!("{dir}/");
    snap.keys()
        .filter(|k| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
        .map(|k| k[prefix.len()..].to_string())
        .collect()
}

/// SPEC problem 1 as layers: `cp -a src/` (random_file01..09), sealing as the threshold is
/// reached, `rm -rf src`, `mkdir src` (opaque over the whiteout), then copying 01, 09, 02,
/// 03, 04, 05, 06 back. 07 and 08 must stay deleted at every merge.
#[test]
fn problem1_deleted_files_do_not_come_back() {
    let f = |n: u32| -> (&'static str, Vec<u8>) {
        let name: &'static str = Box::leak(format!("src/random_file{n:02}").into_boxed_str());
        (name, data(name))
    };
    let file = |n: u32| {
        let (p, d) = f(n);
        File(p, d)
    };
    let layers = vec![
        // newest first
        vec![file(5), file(6)],
        vec![file(3), file(4)],
        vec![file(9), file(2)],
        // rm -rf src; mkdir src; cp random_file01 (the layer sealed with the opaque src)
        vec![Opaque("src"), file(1)],
        vec![file(7), file(8), file(9)],
        vec![file(4), file(5), file(6)],
        vec![file(1), file(2), file(3)],
    ];
    let stack = Stack::build(&layers);
    let oracle = stack.check_all_merges();
    assert_eq!(
        names(&oracle, "/src"),
        [
            "random_file01",
            "random_file02",
            "random_file03",
            "random_file04",
            "random_file05",
            "random_file06",
            "random_file09"
        ]
    );
}

#[test]
fn middle_opaque_under_newer_non_opaque() {
    let layers = vec![
        vec![File("d/x", data("x0")), File("e/top", data("t"))],
        vec![Opaque("d"), File("d/y", data("y1")), Dir("e")],
        vec![
            File("d/z", data("z2")),
            File("d/y", data("y2")),
            File("e/low", data("l2")),
        ],
        vec![File("d/w", data("w3")), File("e/lowest", data("l3"))],
    ];
    let stack = Stack::build(&layers);
    let oracle = stack.check_all_merges();
    assert_eq!(names(&oracle, "/d"), ["x", "y"]);
    assert_eq!(names(&oracle, "/e"), ["low", "lowest", "top"]);
}

#[test]
fn middle_whiteout_of_directory_recreated_newer() {
    let layers = vec![
        vec![File("d/a", data("a0"))],
        vec![Whiteout("d"), File("keep", data("k"))],
        vec![File("d/b", data("b2")), File("d/sub/c", data("c2"))],
        vec![File("d/c", data("c3"))],
    ];
    let stack = Stack::build(&layers);
    let oracle = stack.check_all_merges();
    assert_eq!(names(&oracle, "/d"), ["a"]);
}

#[test]
fn nested_opaque_directories() {
    let layers = vec![
        vec![File("a/b/f0", data("f0")), File("p/q/f0", data("pq0"))],
        vec![
            Opaque("a"),
            File("a/b/f1", data("f1")),
            Dir("p"),
            Opaque("p/q"),
            File("p/q/f1", data("pq1")),
        ],
        vec![
            Opaque("a/b"),
            File("a/b/f2", data("f2")),
            File("a/g2", data("g2")),
            File("p/g2", data("pg2")),
            Opaque("p/q/r"),
            File("p/q/r/x", data("x")),
        ],
        vec![
            File("a/b/f3", data("f3")),
            File("a/g3", data("g3")),
            File("p/q/f3", data("pq3")),
            File("p/g3", data("pg3")),
        ],
    ];
    let stack = Stack::build(&layers);
    let oracle = stack.check_all_merges();
    assert_eq!(names(&oracle, "/a"), ["b"]);
    assert_eq!(names(&oracle, "/a/b"), ["f0", "f1"]);
    assert_eq!(names(&oracle, "/p"), ["g2", "g3", "q"]);
    assert_eq!(names(&oracle, "/p/q"), ["f0", "f1"]);
}

#[test]
fn whiteout_then_recreated_as_another_type() {
    let layers = vec![
        vec![
            Symlink("x", "target"),
            Dir("y"),
            File("y/new", data("yn")),
            Whiteout("z"),
            File("w", data("w0")),
            Fifo("v"),
        ],
        vec![
            Whiteout("x"),
            Whiteout("y"),
            Dir("z"),
            File("z/in", data("zi")),
            Dir("w"),
            File("w/in", data("wi")),
        ],
        vec![
            Dir("x"),
            File("x/child", data("xc")),
            File("y", data("y2")),
            File("v", data("v2")),
        ],
        vec![Dir("y"), File("y/old", data("yo")), File("z", data("z3"))],
    ];
    let stack = Stack::build(&layers);
    let oracle = stack.check_all_merges();
    assert_eq!(oracle["/x"].kind, 'l');
    assert_eq!(oracle["/y"].kind, 'd');
    assert_eq!(names(&oracle, "/y"), ["new"]);
    assert!(!oracle.contains_key("/z"));
    assert_eq!(oracle["/w"].kind, '-');
    assert_eq!(oracle["/v"].kind, 'p');
}

#[test]
fn hard_links_in_merged_layers() {
    let layers = vec![
        vec![
            File("h/new1", data("n")),
            HardLink("h/new2", "h/new1"),
            Whiteout("h/old2"),
            HardLink("other/new3", "h/new1"),
        ],
        vec![
            File("h/old1", data("o")),
            HardLink("h/old2", "h/old1"),
            File("h/tri", data("t")),
            HardLink("h/tri_b", "h/tri"),
            HardLink("tri_c", "h/tri"),
        ],
        vec![File("h/old1", data("older")), File("h/base", data("b"))],
    ];
    let stack = Stack::build(&layers);
    let oracle = stack.check_all_merges();
    assert_eq!(oracle["/h/new2"].link_of.as_deref(), Some("/h/new1"));
    assert_eq!(oracle["/other/new3"].link_of.as_deref(), Some("/h/new1"));
    assert_eq!(oracle["/h/tri_b"].link_of.as_deref(), Some("/h/tri"));
    assert_eq!(oracle["/tri_c"].link_of.as_deref(), Some("/h/tri"));
    assert!(!oracle.contains_key("/h/old2"));

    // In the merged image a hard link is one inode whose nlink counts the names that remain
    // visible (overlayfs reports the lower inode's count, 2 for /h/old1, which is stale).
    let (meta, blobs) = stack.merge(0..3, true, "nlink_check");
    let m = mount_erofs(&meta, &blobs, &stack.dir.path().join("nlink_mnt"));
    let s = snapshot(&m.path, SnapOpts::default());
    assert_eq!(s["/h/new1"].nlink, 3);
    assert_eq!(s["/h/old1"].nlink, 1);
    assert_eq!(s["/h/tri"].nlink, 3);
    assert_eq!(s["/h/tri_b"].link_of.as_deref(), Some("/h/tri"));
}

/// Root attributes come from the top layer (erofs-utils' merge gives 0777), directory mtimes
/// keep their nanoseconds, and the devices are listed in layer order.
#[test]
fn merged_root_mode_and_directory_nanoseconds() {
    let layers = vec![
        vec![Dir("d"), File("d/f", data("f"))],
        vec![Dir("d"), File("g", data("g"))],
    ];
    let stack = Stack::build(&layers);
    let (meta, blobs) = stack.merge(0..2, true, "root_check");
    let m = mount_erofs(&meta, &blobs, &stack.dir.path().join("root_mnt"));
    let s = snapshot(&m.path, SnapOpts::default());
    let top = snapshot(&stack.mounts[0].path, SnapOpts::default());
    assert_eq!(s["/"].mode, top["/"].mode);
    assert_eq!(s["/"].mode & 0o7777, 0o755);
    assert_eq!(s["/"].mtime, top["/"].mtime);
    assert_eq!(s["/d"].mtime, top["/d"].mtime);
    assert_ne!(s["/d"].mtime.1, 0);
    assert_eq!(s["/d"].nlink, 2);
    assert_eq!(s["/"].nlink, 3);
}

/// Merges of merges (as the store does when merged layers accumulate): the device lists
/// concatenate in order and the result still equals overlayfs over the original layers.
#[test]
fn merge_of_merged_images() {
    use spinfs_erofs::{Image, MergeMode, WriteOptions, merge_images};
    use std::fs::File;
    let layers = vec![
        vec![
            File("a/new", data("n")),
            Whiteout("a/gone"),
            Opaque("o"),
            File("o/x", data("ox")),
        ],
        vec![File("a/mid", data("m")), Whiteout("b")],
        vec![
            File("a/gone", data("g")),
            File("b/inner", data("bi")),
            File("o/hidden", data("oh")),
        ],
        vec![
            Dir("a"),
            File("a/base", data("base")),
            File("b/old", data("bo")),
            File("o/y", data("oy")),
        ],
    ];
    let stack = Stack::build(&layers);
    let o = SnapOpts {
        nlink: false,
        dir_nlink: false,
        hide_overlay_xattrs: true,
        content: true,
    };
    let oracle_mnt = stack.overlay(&stack.layer_mounts(0..4), "oracle_mm");
    let oracle = snapshot(&oracle_mnt.path, o);
    drop(oracle_mnt);

    let (m01, _) = stack.merge(0..2, false, "m01");
    let (m23, _) = stack.merge(2..4, false, "m23");
    let images: Vec<_> = [&m01, &m23]
        .iter()
        .map(|m| Image::open(File::open(m).unwrap()).unwrap())
        .collect();
    let out = stack.dir.path().join("m0123");
    let s = merge_images(
        &images,
        MergeMode::StripOverlay,
        &WriteOptions::default(),
        &mut File::create(&out).unwrap(),
    )
    .unwrap();
    let order: Vec<(usize, u16)> = s
        .devices
        .iter()
        .map(|d| (d.layer, d.layer_device))
        .collect();
    assert_eq!(order, [(0, 1), (0, 2), (1, 1), (1, 2)]);
    fsck(&out, &stack.blobs, None);
    let m = mount_erofs(&out, &stack.blobs, &stack.dir.path().join("mnt_m0123"));
    assert_same(
        "merge of merges vs overlayfs",
        &oracle,
        &snapshot(&m.path, o),
    );
    assert_eq!(names(&oracle, "/a"), ["base", "mid", "new"]);
    assert_eq!(names(&oracle, "/o"), ["x"]);
    assert!(!oracle.contains_key("/b"));
}

/// overlayfs ignores an opaque marker on a layer's root directory; so must the merge.
#[test]
fn opaque_marker_on_a_layer_root_is_ignored() {
    let layers = vec![
        vec![Opaque("."), File("a", data("a"))],
        vec![
            Opaque("."),
            File("b", data("b")),
            Opaque("d"),
            File("d/x", data("x")),
        ],
        vec![File("c", data("c")), File("d/y", data("y"))],
    ];
    let stack = Stack::build(&layers);
    let oracle = stack.check_all_merges();
    assert!(oracle.contains_key("/a") && oracle.contains_key("/b") && oracle.contains_key("/c"));
    assert_eq!(names(&oracle, "/d"), ["x"]);
}
