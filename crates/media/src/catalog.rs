//! The catalogue: what a medium holds, rebuilt by scanning its containers alone; and the
//! verification of every object checksum.

use crate::error::{MediaError, Result};
use crate::layout::{Extent, ImageExtents, ImageRef, MediumId, Record, push_extent};
use crate::medium::Medium;
use std::collections::{BTreeMap, HashMap};

/// What one container holds.
#[derive(Debug, Clone, Default)]
pub struct ContainerSummary {
    pub index: u64,
    /// Recorded objects and the container's object slots.
    pub objects: u64,
    pub object_slots: u64,
    /// Data bytes held, and the usable bytes of a container.
    pub data_bytes: u64,
    pub usable: u64,
    pub record_blocks: u64,
    pub record_slots: u64,
    /// Bytes held per image.
    pub images: BTreeMap<ImageRef, u64>,
    /// Images whose completion marker is in this container.
    pub markers: Vec<ImageRef>,
    /// Why the record log ended early (a torn tail, ignored).
    pub torn_log: Option<String>,
    /// Data was found after the last recorded object (a torn tail, ignored).
    pub unrecorded_tail: bool,
    /// Problems that are damage, not a torn tail.
    pub problems: Vec<String>,
}

/// A stream of objects without a valid completion marker: an interrupted or abandoned write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteImage {
    pub image: ImageRef,
    pub stream: u64,
    pub objects: u64,
    pub bytes: u64,
}

/// Everything a medium holds.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    pub medium: Option<MediumId>,
    pub containers: Vec<ContainerSummary>,
    /// Complete images (the latest complete write of each).
    pub images: BTreeMap<ImageRef, ImageExtents>,
    pub incomplete: Vec<IncompleteImage>,
    /// Damage found while building the catalogue.
    pub problems: Vec<String>,
}

struct ObjectAt {
    container: u64,
    object: u64,
    image_offset: u64,
    len: u64,
}

impl Catalogue {
    /// Scans every container of `medium`; `progress(done, total)` is called per container.
    pub fn scan(medium: &Medium, progress: &mut dyn FnMut(u64, u64)) -> Result<Catalogue> {
        let g = medium.geometry();
        let n = medium.containers()?;
        let mut cat = Catalogue {
            medium: medium.id(),
            ..Catalogue::default()
        };
        let mut streams: HashMap<(ImageRef, u64), Vec<ObjectAt>> = HashMap::new();
        // Markers in medium order: a later complete write of an image supersedes an earlier.
        let mut markers: Vec<(ImageRef, u64, u64, u32, u32, u64)> = Vec::new();
        for c in 0..n {
            progress(c, n);
            let scan = match medium.scan_container(c) {
                Ok(s) => s,
                Err(e @ MediaError::BadContainer { .. }) => {
                    cat.problems.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut sum = ContainerSummary {
                index: c,
                object_slots: g.objects_per_container(),
                usable: g.usable(),
                record_blocks: scan.record_blocks,
                record_slots: g.record_slots(),
                torn_log: scan.torn_log.clone(),
                problems: scan
                    .bad_records
                    .iter()
                    .map(|r| format!("container {c}: {r}"))
                    .collect(),
                ..ContainerSummary::default()
            };
            for (_, r) in &scan.records {
                match *r {
                    Record::Object {
                        object,
                        image,
                        stream,
                        image_offset,
                        len,
                        ..
                    } => {
                        if scan
                            .objects
                            .get(object as usize)
                            .copied()
                            .flatten()
                            .is_none()
                        {
                            continue; // rejected as a bad record above
                        }
                        sum.objects += 1;
                        sum.data_bytes += len as u64;
                        *sum.images.entry(image).or_default() += len as u64;
                        streams.entry((image, stream)).or_default().push(ObjectAt {
                            container: c,
                            object: object as u64,
                            image_offset,
                            len: len as u64,
                        });
                    }
                    Record::Complete {
                        image,
                        stream,
                        length,
                        objects,
                        crc,
                    } => {
                        sum.markers.push(image);
                        markers.push((image, stream, length, objects, crc, c));
                    }
                }
            }
            let next = scan.next_object();
            if next < g.objects_per_container() {
                let probe = medium.read_object_raw(c, next, crate::layout::BLOCK);
                sum.unrecorded_tail = matches!(probe, Ok(b) if b.iter().any(|&x| x != 0));
            }
            cat.containers.push(sum);
        }
        progress(n, n);
        let mut complete_streams = std::collections::HashSet::new();
        for (image, stream, length, objects, crc, c) in markers {
            let mut objs = streams
                .get(&(image, stream))
                .map_or(&[][..], |v| &v[..])
                .iter()
                .collect::<Vec<_>>();
            objs.sort_by_key(|o| o.image_offset);
            let mut extents = Vec::new();
            let mut at = 0;
            let mut ok = objs.len() == objects as usize;
            for o in &objs {
                if o.image_offset != at {
                    ok = false;
                    break;
                }
                push_extent(
                    &mut extents,
                    Extent {
                        container: o.container,
                        offset: o.object * g.object_size,
                        length: o.len,
                        image_offset: at,
                    },
                );
                at += o.len;
            }
            if !ok || at != length {
                cat.problems.push(format!(
                    "{image}: completion marker in container {c} says {length} bytes in {objects} \
                     objects, the medium holds {at} bytes in {} objects of that write",
                    objs.len()
                ));
                continue;
            }
            complete_streams.insert((image, stream));
            cat.images.insert(
                image,
                ImageExtents {
                    image,
                    length,
                    crc,
                    extents,
                },
            );
        }
        let mut incomplete: Vec<IncompleteImage> = streams
            .iter()
            .filter(|(k, _)| !complete_streams.contains(*k))
            .map(|((image, stream), objs)| IncompleteImage {
                image: *image,
                stream: *stream,
                objects: objs.len() as u64,
                bytes: objs.iter().map(|o| o.len).sum(),
            })
            .collect();
        incomplete.sort_by_key(|i| (i.stream, i.image));
        cat.incomplete = incomplete;
        for s in &cat.containers {
            cat.problems.extend(s.problems.iter().cloned());
        }
        Ok(cat)
    }
}

/// One object whose data does not match its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedObject {
    pub container: u64,
    pub object: u64,
    pub image: Option<ImageRef>,
    pub reason: String,
}

/// Result of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub containers: u64,
    pub objects: u64,
    pub bytes: u64,
    pub damaged: Vec<DamagedObject>,
    /// Other damage: bad containers, impossible records, inconsistent images.
    pub problems: Vec<String>,
    /// Torn tails found (expected after a crash; ignored data, not damage).
    pub torn: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.problems.is_empty()
    }
}

/// Reads every recorded object of every container and checks its checksum.
/// `progress(bytes_done, bytes_total)` is called as objects are checked.
pub fn verify(medium: &Medium, progress: &mut dyn FnMut(u64, u64)) -> Result<VerifyReport> {
    let cat = Catalogue::scan(medium, &mut |_, _| {})?;
    let total: u64 = cat.containers.iter().map(|c| c.data_bytes).sum();
    let mut rep = VerifyReport {
        containers: cat.containers.len() as u64,
        problems: cat.problems.clone(),
        ..VerifyReport::default()
    };
    for s in &cat.containers {
        if let Some(t) = &s.torn_log {
            rep.torn.push(format!("container {}: {t}", s.index));
        }
        if s.unrecorded_tail {
            rep.torn.push(format!(
                "container {}: unrecorded data after the last object",
                s.index
            ));
        }
    }
    let mut done = 0;
    for s in &cat.containers {
        let scan = match medium.scan_container(s.index) {
            Ok(x) => x,
            Err(_) => continue, // already in problems
        };
        for (o, slot) in scan.objects.iter().enumerate() {
            let Some(i) = slot else { continue };
            let rec = &scan.records[*i].1;
            let Record::Object { len, image, .. } = *rec else {
                continue;
            };
            let o = o as u64;
            let res = medium
                .read_object_raw(s.index, o, len as u64)
                .and_then(|data| medium.check_object(s.index, o, rec, &data));
            match res {
                Ok(()) => {}
                Err(MediaError::Damaged { reason, .. }) => rep.damaged.push(DamagedObject {
                    container: s.index,
                    object: o,
                    image: Some(image),
                    reason,
                }),
                Err(e) => rep.damaged.push(DamagedObject {
                    container: s.index,
                    object: o,
                    image: Some(image),
                    reason: e.to_string(),
                }),
            }
            rep.objects += 1;
            rep.bytes += len as u64;
            done += len as u64;
            progress(done, total);
        }
    }
    Ok(rep)
}
