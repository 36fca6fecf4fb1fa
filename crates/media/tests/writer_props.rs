//! Property: any sequence of appends, commits, finishes and aborts gives a medium whose
//! rebuilt catalogue equals what the writer returned, and every range reads back exactly.

use proptest::prelude::*;
use spinfs_media::backend::BackendOptions;
use spinfs_media::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Step {
    Append(usize),
    Commit,
    Finish,
    Abort,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (1usize..200_000).prop_map(Step::Append),
        2 => Just(Step::Commit),
        3 => Just(Step::Finish),
        1 => Just(Step::Abort),
    ]
}

fn byte(image: u64, off: u64) -> u8 {
    (image.wrapping_mul(131) ^ off.wrapping_mul(7) ^ (off >> 9)) as u8
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn catalogue_matches_writer(steps in prop::collection::vec(step(), 1..40), pwrite in any::<bool>()) {
        let t = tempfile::tempdir().unwrap();
        let uri = format!("dir:{}", t.path().join("m").display());
        let g = Geometry::with_default_reserve(1 << 20, 64 << 10, 256 << 10).unwrap();
        let opts = BackendOptions {
            engine: if pwrite { EngineChoice::Pwrite } else { EngineChoice::Auto },
            direct: true,
            read_only: false,
        };
        let m = Medium::open(&uri, g, opts).unwrap();
        let mut w = MediumWriter::open(m.clone(), None).unwrap();
        let mut next_id = 0u64;
        let mut open: Option<(ImageRef, u64)> = None;
        let mut finished: Vec<ImageExtents> = Vec::new();
        let mut committed: BTreeMap<ImageRef, ImageExtents> = BTreeMap::new();
        for s in steps {
            match s {
                Step::Append(n) => {
                    let (img, len) = *open.get_or_insert_with(|| {
                        next_id += 1;
                        let img = ImageRef { id: next_id, kind: ImageKind::Blob };
                        w.begin_image(img).unwrap();
                        (img, 0)
                    });
                    let bytes: Vec<u8> = (len..len + n as u64).map(|o| byte(img.id, o)).collect();
                    let ext = w.append(&bytes).unwrap();
                    prop_assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), n as u64);
                    open = Some((img, len + n as u64));
                }
                Step::Commit => {
                    w.commit().unwrap();
                    for e in finished.drain(..) {
                        committed.insert(e.image, e);
                    }
                }
                Step::Finish => {
                    if open.take().is_some() {
                        finished.push(w.finish_image().unwrap());
                    }
                }
                Step::Abort => {
                    if open.take().is_some() {
                        w.abort_image().unwrap();
                    }
                }
            }
        }
        // A crash now: nothing after the last commit may appear complete.
        drop(w);
        let m = Medium::open(&uri, g, BackendOptions::default()).unwrap();
        let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
        prop_assert!(cat.problems.is_empty(), "{:?}", cat.problems);
        // Everything committed is there; a finished but uncommitted image may also be (its
        // marker can reach the media early, e.g. when its container fills), never anything
        // else, and always with the extents the writer returned.
        for (img, e) in &committed {
            prop_assert_eq!(cat.images.get(img), Some(e));
        }
        for (img, e) in &cat.images {
            let known = committed.get(img).or_else(|| finished.iter().find(|f| f.image == *img));
            prop_assert_eq!(Some(e), known);
        }
        let r = MediumReader::new(m.clone(), None);
        for e in committed.values() {
            let all = r.read(e, 0, e.length, ReadOptions::default()).unwrap();
            prop_assert!(all.iter().enumerate().all(|(o, &b)| b == byte(e.image.id, o as u64)));
            if e.length > 3 {
                let (a, b) = (e.length / 3, e.length / 2);
                let part = r.read(e, a, b - a + 1, ReadOptions::default()).unwrap();
                prop_assert_eq!(&part[..], &all[a as usize..=b as usize]);
            }
        }
        let rep = verify(&m, &mut |_, _| ()).unwrap();
        prop_assert!(rep.is_clean(), "{:?}", rep);
    }
}
