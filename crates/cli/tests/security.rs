//! Hostile users and hostile input (issue 8 item 7):
//! - without `-o allow_other` no other user can reach the mount (with it, the kernel's
//!   permission checks apply as on any filesystem);
//! - a crafted meta image placed as a layer (names with '/', "..", NUL) cannot make the
//!   daemon create or reach anything outside the store, and the daemon keeps serving;
//! - symlink targets in archived layers are data: readlink returns them, and copy-up, seal
//!   and export never follow them (a canary file outside the store stays untouched);
//! - the control socket is its owner's only (mode 0600, SO_PEERCRED) and answers malformed,
//!   oversized and unknown requests with an error while the daemon keeps running;
//! - permission checks on archived files and directories are the same as on new ones.

mod common;

use common::*;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NOBODY: (u32, u32) = (65534, 65534);

/// A store mounted with exactly `opts` (Mounted always adds allow_other).
struct Bare {
    _dir: tempfile::TempDir,
    store: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl Bare {
    fn new() -> Bare {
        let dir = tempfile::Builder::new()
            .prefix("sec")
            .tempdir_in(test_root())
            .unwrap();
        set_mode(dir.path(), 0o755);
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        spinfs_ok(&["mkfs", store.to_str().unwrap()]);
        Bare {
            _dir: dir,
            store,
            mnt,
            mounted: false,
        }
    }
    fn mount(&mut self, opts: &[&str]) {
        let mut args = vec![
            "mount",
            self.store.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
        ];
        args.extend_from_slice(opts);
        spinfs_ok(&args);
        self.mounted = true;
    }
    fn umount(&mut self) {
        spinfs_ok(&["umount", self.mnt.to_str().unwrap()]);
        self.mounted = false;
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        if self.mounted {
            let _ = spinfs(&["umount", self.mnt.to_str().unwrap()]);
        }
    }
}

#[test]
fn other_users_cannot_reach_the_mount_without_allow_other() {
    let mut b = Bare::new();
    b.mount(&[]);
    set_mode(&b.mnt, 0o777);
    fs::write(b.mnt.join("f"), b"data").unwrap();
    set_mode(&b.mnt.join("f"), 0o644);
    let mnt = b.mnt.to_str().unwrap().to_string();
    let f = b.mnt.join("f").to_str().unwrap().to_string();
    for cmd in [
        vec!["stat", mnt.as_str()],
        vec!["ls", mnt.as_str()],
        vec!["cat", f.as_str()],
        vec!["touch", &format!("{mnt}/new")],
    ] {
        let out = as_user(NOBODY.0, NOBODY.1, &cmd);
        assert!(
            !out.status.success() && stderr(&out).contains("Permission denied"),
            "{cmd:?} as nobody without allow_other: {:?} {}",
            out.status,
            stderr(&out)
        );
    }
    assert!(!b.mnt.join("new").exists());
    // the owner (root) still works, and with allow_other the normal checks apply
    assert_eq!(fs::read(b.mnt.join("f")).unwrap(), b"data");
    b.umount();
    b.mount(&["-o", "allow_other"]);
    let out = as_user(NOBODY.0, NOBODY.1, &["cat", &f]);
    assert!(
        out.status.success(),
        "cat as nobody with allow_other: {}",
        stderr(&out)
    );
    assert_eq!(out.stdout, b"data");
    set_mode(&b.mnt, 0o755);
    let out = as_user(NOBODY.0, NOBODY.1, &["touch", &format!("{mnt}/new")]);
    assert!(
        !out.status.success(),
        "nobody created a file in a 0755 root dir"
    );
}

/// The canary outside the store that no crafted input may touch: (path, content, metadata).
fn canary(root: &Path) -> (PathBuf, fs::Metadata) {
    let dir = root.join("outside");
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join("secret");
    fs::write(&p, b"secret").unwrap();
    set_mode(&p, 0o600);
    let meta = fs::metadata(&p).unwrap();
    (p, meta)
}

fn canary_untouched(p: &Path, before: &fs::Metadata, ctx: &str) {
    let now = fs::metadata(p).unwrap();
    assert_eq!(fs::read(p).unwrap(), b"secret", "{ctx}: canary content");
    assert_eq!(
        (
            now.mode(),
            now.uid(),
            now.gid(),
            now.mtime(),
            now.ctime(),
            now.nlink()
        ),
        (
            before.mode(),
            before.uid(),
            before.gid(),
            before.mtime(),
            before.ctime(),
            before.nlink()
        ),
        "{ctx}: canary metadata changed"
    );
    let siblings = names(p.parent().unwrap());
    assert_eq!(
        siblings,
        ["secret".to_string()].into_iter().collect(),
        "{ctx}: something was created beside the canary"
    );
}

#[test]
fn symlinks_in_archived_layers_are_data_never_followed() {
    let m = Mounted::new(&["--chunk-size", "64K", "--object-size", "64K"]);
    let (secret, before) = canary(m.dir.path());
    let abs = secret.to_str().unwrap().to_string();
    // relative: from mnt/d/ up to the test dir, then outside/secret
    let rel = "../../../../../../../../../../../..".to_string() + &abs;
    fs::create_dir(m.path("d")).unwrap();
    std::os::unix::fs::symlink(&abs, m.path("d/abs")).unwrap();
    std::os::unix::fs::symlink(&rel, m.path("d/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", m.path("d/shadow")).unwrap();
    std::os::unix::fs::symlink(m.dir.path().join("outside"), m.path("d/outdir")).unwrap();
    let shadow_before = fs::symlink_metadata("/etc/shadow").ok();
    archive_now(&m);
    assert!(archived_layers(&m) >= 1);
    let ctx = "archived";
    for (name, target) in [
        ("abs", abs.as_str()),
        ("rel", rel.as_str()),
        ("shadow", "/etc/shadow"),
    ] {
        assert_eq!(
            fs::read_link(m.path(&format!("d/{name}"))).unwrap(),
            PathBuf::from(target),
            "{ctx}: readlink {name}"
        );
        assert!(
            fs::symlink_metadata(m.path(&format!("d/{name}")))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    canary_untouched(&secret, &before, ctx);
    // copy-up of the links themselves: lchown, utimensat(AT_SYMLINK_NOFOLLOW), lsetxattr,
    // rename and link of the symlinks
    for name in ["abs", "rel", "shadow", "outdir"] {
        let p = m.path(&format!("d/{name}"));
        std::os::unix::fs::lchown(&p, Some(4242), Some(4242)).unwrap();
        let st = std::process::Command::new("touch")
            .args(["-h", "-d", "2001-01-01"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        let st = std::process::Command::new("setfattr")
            .args(["-h", "-n", "trusted.x", "-v", "1"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "setfattr -h on {name}");
    }
    fs::rename(m.path("d/rel"), m.path("d/rel2")).unwrap();
    fs::hard_link(m.path("d/abs"), m.path("d/abs2")).unwrap();
    let ctx = "after copy-up";
    canary_untouched(&secret, &before, ctx);
    assert_eq!(
        fs::symlink_metadata("/etc/shadow")
            .ok()
            .map(|m| (m.uid(), m.mtime())),
        shadow_before.as_ref().map(|m| (m.uid(), m.mtime()))
    );
    let l = fs::symlink_metadata(m.path("d/abs")).unwrap();
    assert!(
        l.file_type().is_symlink() && l.uid() == 4242,
        "{ctx}: lchown applies to the link"
    );
    assert_eq!(
        fs::read_link(m.path("d/rel2")).unwrap(),
        PathBuf::from(&rel)
    );
    // the SSD tree holds symlinks, not copies of what they point at
    let upper = fs::read_dir(m.store.join("gens"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let ut = upper.join("tree/d");
    for name in ["abs", "rel2", "shadow", "outdir"] {
        let md = fs::symlink_metadata(ut.join(name)).unwrap();
        assert!(
            md.file_type().is_symlink(),
            "{ctx}: upper {name} is not a symlink"
        );
    }
    // sealed again, then exported: still links, nothing outside touched
    archive_now(&m);
    let ctx = "after a second seal";
    canary_untouched(&secret, &before, ctx);
    assert_eq!(fs::read_link(m.path("d/abs")).unwrap(), PathBuf::from(&abs));
    let s = status(&m);
    let top = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "archived")
        .map(|l| l["id"].as_u64().unwrap())
        .max()
        .unwrap();
    let out_dir = m.dir.path().join("export");
    spinfs_ok(&[
        "export",
        m.store.to_str().unwrap(),
        "--layer",
        &top.to_string(),
        out_dir.to_str().unwrap(),
    ]);
    for e in names(&out_dir) {
        assert!(
            e.starts_with("meta.") || e.starts_with("blob."),
            "export wrote {e}"
        );
    }
    let meta = out_dir.join(format!("meta.{top}"));
    let ls = spinfs_ok(&["image", "ls", meta.to_str().unwrap(), "/d"]);
    let ls = String::from_utf8_lossy(&ls.stdout).into_owned();
    assert!(
        ls.contains(&abs) && ls.contains("/etc/shadow"),
        "export: symlinks listed with their targets:\n{ls}"
    );
    canary_untouched(&secret, &before, "after export");
}

/// Unmounts a spinfs mount on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let out = spinfs(&["umount", self.0.to_str().unwrap()]);
        if !out.status.success() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

/// Rewrites every occurrence of `from` in `bytes` with `to` (same length).
fn patch(bytes: &mut [u8], from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut n = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            n += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    n
}

#[test]
fn crafted_names_in_a_layer_cannot_escape_the_store() {
    let mut m = Mounted::new(&["--chunk-size", "64K", "--object-size", "64K"]);
    let (secret, before) = canary(m.dir.path());
    // names of the same length as the hostile ones they become
    let outside = m.dir.path().join("outside");
    let hostile: Vec<(String, Vec<u8>)> = vec![
        ("Q".repeat(2), b"..".to_vec()),
        ("W".repeat(5), b"a/../".to_vec()),
        ("E".repeat(7), b"ev\0il..".to_vec()),
        ("R".repeat(3), b"../".to_vec()),
    ];
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("ok"), b"fine").unwrap();
    for (name, _) in &hostile {
        fs::create_dir(m.path(&format!("d/{name}"))).unwrap();
        fs::write(m.path(&format!("d/{name}/secret")), b"x").unwrap();
    }
    archive_now(&m);
    m.umount();
    let layers: Vec<PathBuf> = fs::read_dir(m.store.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "meta"))
        .collect();
    assert_eq!(layers.len(), 1);
    let mut img = fs::read(&layers[0]).unwrap();
    for (name, evil) in &hostile {
        assert!(
            patch(&mut img, name.as_bytes(), evil) >= 1,
            "{name} not found in the image"
        );
    }
    // a hostile image is consistent: its superblock checksum (over bytes 1024..4096, where
    // a small image's inodes and directories live) is recomputed
    if img.len() >= 4096 {
        let mut sb = img[1024..4096].to_vec();
        sb[4..8].fill(0);
        let crc = !crc32c::crc32c(&sb);
        img[1028..1032].copy_from_slice(&crc.to_le_bytes());
    }
    fs::write(&layers[0], &img).unwrap();
    // ... and so is the store that names it: the manifest records the crafted meta's checksum
    // (as if the medium itself carried the crafted image), so the mount cannot tell it from a
    // genuine one and does not replace it with the media copy.
    let mpath = m.store.join("manifest");
    let mut manifest = spinfs_store::manifest::Manifest::load(&mpath).unwrap();
    manifest.layers[0].meta.crc = crc32c::crc32c(&img);
    manifest.commit(&mpath).unwrap();
    // Either the mount refuses the layer with a clear error, or it serves and rejects the
    // hostile directory; in both cases nothing outside the store is created or reached.
    let out = spinfs(&["mount", m.store.to_str().unwrap(), m.mnt.to_str().unwrap()]);
    if out.status.success() {
        println!("the mount took the crafted layer; its hostile entries must be refused");
        let log = fs::read_to_string(m.store.join("spinfs.log")).unwrap_or_default();
        assert!(
            !log.contains("restored from its media copy"),
            "the crafted meta was replaced, so nothing hostile was served: {log}"
        );
        let _guard = Unmount(m.mnt.clone());
        let listing = fs::read_dir(m.path("d"));
        match listing {
            Ok(entries) => {
                for e in entries.flatten() {
                    let n = e.file_name();
                    let b = n.as_encoded_bytes();
                    assert!(
                        !b.contains(&b'/') && !b.contains(&0) && b != b".." && b != b".",
                        "listed a hostile name {n:?}"
                    );
                }
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        }
        for (_, evil) in &hostile {
            let name = String::from_utf8_lossy(evil).replace('\0', "");
            let _ = fs::read(m.path(&format!("d/{name}/secret")));
            let _ = fs::write(m.path(&format!("d/{name}/secret")), b"pwned");
            let _ = fs::create_dir(m.path(&format!("d/{name}/made")));
        }
        // copy-up and seal of the damaged directory's neighbours still work
        fs::write(m.path("new"), b"new").unwrap();
        assert_eq!(fs::read(m.path("ok")).unwrap(), b"fine");
        let _ = spinfs(&["archive", m.store.to_str().unwrap(), "--wait"]);
        assert_eq!(
            fs::read(m.path("new")).unwrap(),
            b"new",
            "the daemon keeps serving"
        );
    } else {
        let e = stderr(&out);
        println!("the mount refused the crafted layer: {e}");
        assert_eq!(e.trim().lines().count(), 1, "one-line error: {e}");
    }
    canary_untouched(&secret, &before, "crafted names");
    assert_eq!(
        names(&outside),
        ["secret".to_string()].into_iter().collect()
    );
    for p in ["made", "secret", "evil", "il"] {
        assert!(
            !m.dir.path().join(p).exists(),
            "{p} created beside the store"
        );
        assert!(!m.store.join(p).exists(), "{p} created in the store root");
    }
}

/// One request on the control socket, the answer line (empty when the daemon hung up).
fn control(sock: &Path, request: &[u8]) -> String {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(request);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

#[test]
fn control_socket_is_owner_only_and_validates_requests() {
    let m = Mounted::new(&[]);
    let sock = m.store.join("control.sock");
    assert_eq!(fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
    set_mode(&m.store, 0o755);
    // another user: the socket's mode refuses the connection
    let out = as_user(
        NOBODY.0,
        NOBODY.1,
        &[
            "/usr/bin/python3",
            "-c",
            &format!(
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect({:?})\nexcept OSError as e:\n print('refused', e.errno); sys.exit(0)\ns.sendall(b'{{\"cmd\":\"status\"}}\\n'); print('answer', s.recv(100))",
                sock.to_str().unwrap()
            ),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("refused 13"),
        "nobody reached the socket: {text}{}",
        stderr(&out)
    );
    // even with the mode opened, SO_PEERCRED turns another user away without an answer
    set_mode(&sock, 0o666);
    let out = as_user(
        NOBODY.0,
        NOBODY.1,
        &[
            "/usr/bin/python3",
            "-c",
            &format!(
                "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ntry:\n s.sendall(b'{{\"cmd\":\"archive\"}}\\n')\n a=s.recv(100)\nexcept OSError:\n a=b''\nprint('answer', repr(a))",
                sock.to_str().unwrap()
            ),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "answer b''",
        "peer check: {text}{}",
        stderr(&out)
    );
    set_mode(&sock, 0o600);
    // hostile requests from the owner: each gets an error answer
    let mut long = vec![b'{'; 100_000];
    long.push(b'\n');
    for (req, want) in [
        (&b"not json\n"[..], "bad request"),
        (b"{\"cmd\":\"rm -rf /\"}\n", "unknown command"),
        (b"{\"cmd\":\"status\",\"extra\":1}\n", "unexpected field"),
        (b"{\"cmd\":\"archive\",\"wait\":\"yes\"}\n", "boolean"),
        (b"[1,2,3]\n", "not a JSON object"),
        (b"\xff\xfe\x00\x01\n", "bad request"),
        (&long[..], "too long"),
        (b"", "bad request"),
    ] {
        let answer = control(&sock, req);
        let v: serde_json::Value = serde_json::from_str(answer.trim()).unwrap_or_else(|e| {
            panic!(
                "answer to {:?}: {answer:?}: {e}",
                String::from_utf8_lossy(&req[..req.len().min(40)])
            )
        });
        assert_eq!(v["ok"], false, "{answer}");
        assert!(
            v["error"].as_str().unwrap().contains(want),
            "{answer} should say {want}"
        );
    }
    // a client that connects and never sends does not block others
    let _idle = UnixStream::connect(&sock).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(control(&sock, b"{\"cmd\":\"status\"}\n").trim()).unwrap();
    assert_eq!(v["ok"], true);
    fs::write(m.path("f"), b"still serving").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"still serving");
}

#[test]
fn permission_checks_on_archived_entries_match_new_ones() {
    let m = Mounted::new(&[]);
    set_mode(&m.mnt, 0o755);
    let (u, g) = (4242u32, 4242u32);
    let mk = |name: &str, mode: u32, owner: u32| {
        let p = m.path(name);
        fs::write(&p, b"content").unwrap();
        std::os::unix::fs::chown(&p, Some(owner), Some(owner)).unwrap();
        set_mode(&p, mode);
    };
    // two identical trees: "arch" gets sealed, "new" is made after the seal, on the SSD
    let make_tree = |top: &str| {
        fs::create_dir(m.path(top)).unwrap();
        set_mode(&m.path(top), 0o755);
        mk(&format!("{top}/private"), 0o600, u);
        mk(&format!("{top}/readable"), 0o644, u);
        mk(&format!("{top}/groupw"), 0o664, u);
        mk(&format!("{top}/mine"), 0o600, NOBODY.0);
        let closed = m.path(&format!("{top}/closed"));
        fs::create_dir(&closed).unwrap();
        mk(&format!("{top}/closed/inner"), 0o644, u);
        set_mode(&closed, 0o700);
        std::os::unix::fs::chown(&closed, Some(u), Some(g)).unwrap();
        let sticky = m.path(&format!("{top}/sticky"));
        fs::create_dir(&sticky).unwrap();
        set_mode(&sticky, 0o1777);
        mk(&format!("{top}/sticky/theirs"), 0o666, u);
    };
    make_tree("arch");
    archive_now(&m);
    make_tree("new");
    let mnt = m.mnt.to_str().unwrap().to_string();
    let run = |top: &str, cmd: &[&str]| -> bool {
        let cmd: Vec<String> = cmd
            .iter()
            .map(|c| c.replace("TOP", &format!("{mnt}/{top}")))
            .collect();
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        as_user(NOBODY.0, NOBODY.1, &cmd).status.success()
    };
    let cases: Vec<(&[&str], bool)> = vec![
        (&["cat", "TOP/private"], false),
        (&["cat", "TOP/readable"], true),
        (&["sh", "-c", "echo x >> TOP/readable"], false),
        (&["sh", "-c", "echo x >> TOP/groupw"], false),
        (&["chmod", "777", "TOP/readable"], false),
        (&["chown", "65534", "TOP/readable"], false),
        (&["touch", "-d", "2001-01-01", "TOP/readable"], false),
        (&["truncate", "-s", "0", "TOP/readable"], false),
        (&["cat", "TOP/closed/inner"], false),
        (&["ls", "TOP/closed"], false),
        (&["rm", "-f", "TOP/sticky/theirs"], false),
        (&["mv", "TOP/sticky/theirs", "TOP/sticky/moved"], false),
        (&["rm", "-f", "TOP/readable"], false),
        (&["touch", "TOP/newfile"], false),
        (&["chmod", "644", "TOP/mine"], true),
        (&["cat", "TOP/mine"], true),
        (&["sh", "-c", "echo x >> TOP/mine"], true),
        (&["touch", "TOP/sticky/ok"], true),
    ];
    for (cmd, want) in &cases {
        let a = run("arch", cmd);
        let n = run("new", cmd);
        assert_eq!(n, *want, "on new files: {cmd:?}");
        assert_eq!(a, *want, "on archived files: {cmd:?} (new files give {n})");
    }
    // nothing changed where nobody was refused
    for top in ["arch", "new"] {
        assert_eq!(
            fs::read(m.path(&format!("{top}/readable"))).unwrap(),
            b"content"
        );
        assert_eq!(
            fs::metadata(m.path(&format!("{top}/readable")))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o644
        );
        assert!(m.path(&format!("{top}/sticky/theirs")).exists());
    }
}
