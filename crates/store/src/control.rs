//! The daemon's control socket (`STORE/control.sock`): one JSON request line, one JSON answer
//! line. Only the daemon's own user may connect (mode 0600 and a peer-credential check), and
//! every request is validated; unknown or malformed ones get an error answer.

use crate::archiver::{Archiver, SealOutcome};
use crate::layout::StoreLayout;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Longest request accepted.
const MAX_REQUEST: u64 = 4096;

/// A request as the daemon understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    Archive { wait: bool },
    Merge { wait: bool },
}

/// Parses one request line; a precise message for anything else.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))?;
    let obj = v.as_object().ok_or("bad request: not a JSON object")?;
    let cmd = obj
        .get("cmd")
        .and_then(Value::as_str)
        .ok_or("bad request: no \"cmd\" string")?;
    let allowed: &[&str] = match cmd {
        "status" => &["cmd"],
        "archive" | "merge" => &["cmd", "wait"],
        other => return Err(format!("unknown command '{other}'")),
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("bad request: unexpected field '{k}'"));
    }
    let wait = match obj.get("wait") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("bad request: \"wait\" must be a boolean".into()),
    };
    Ok(match cmd {
        "status" => Request::Status,
        "merge" => Request::Merge { wait },
        _ => Request::Archive { wait },
    })
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for getsockopt to fill.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// Serves the control socket in a background thread. `status` builds the status answer.
pub fn serve(
    layout: &StoreLayout,
    archiver: Arc<Archiver>,
    status: Arc<dyn Fn() -> Value + Send + Sync>,
) -> std::io::Result<()> {
    let path = layout.control_socket();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    std::thread::Builder::new()
        .name("spinfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if peer_uid(&conn) != Some(me) {
                    continue; // dropped: only the daemon's user may talk to it
                }
                let archiver = archiver.clone();
                let status = status.clone();
                std::thread::spawn(move || handle(conn, &archiver, &*status));
            }
        })?;
    Ok(())
}

fn handle(conn: UnixStream, archiver: &Archiver, status: &dyn Fn() -> Value) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = Vec::new();
    let mut reader = BufReader::new((&conn).take(MAX_REQUEST + 1));
    if reader.read_until(b'\n', &mut line).is_err() {
        return;
    }
    let answer = if line.len() as u64 > MAX_REQUEST {
        json!({"ok": false, "error": "request too long"})
    } else {
        match parse_request(line.strip_suffix(b"\n").unwrap_or(&line)) {
            Err(e) => json!({"ok": false, "error": e}),
            Ok(Request::Status) => json!({"ok": true, "status": status()}),
            Ok(Request::Archive { wait }) => match archiver.request(wait) {
                Ok(SealOutcome::Sealed {
                    layer,
                    files,
                    bytes,
                }) => {
                    json!({"ok": true, "sealed": {"layer": layer, "files": files, "bytes": bytes}})
                }
                Ok(SealOutcome::Empty) => json!({"ok": true, "empty": true}),
                Ok(SealOutcome::Queued) => json!({"ok": true, "queued": true}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Ok(Request::Merge { wait }) => match archiver.request_merge(wait) {
                Ok(Some(layer)) => json!({"ok": true, "merged": layer}),
                Ok(None) => json!({"ok": true, "merged": null}),
                Err(e) => json!({"ok": false, "error": e}),
            },
        }
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
}

/// Sends one request to the daemon of `store` and returns its answer.
pub fn call(store: &Path, request: &Value, timeout: Option<Duration>) -> Result<Value, String> {
    let path = StoreLayout::new(store).control_socket();
    let conn = UnixStream::connect(&path)
        .map_err(|e| format!("cannot reach the daemon at {}: {e}", path.display()))?;
    conn.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    (&conn)
        .write_all(&line)
        .map_err(|e| format!("control socket: {e}"))?;
    let mut answer = Vec::new();
    BufReader::new(&conn)
        .read_until(b'\n', &mut answer)
        .map_err(|e| format!("control socket: {e}"))?;
    let v: Value =
        serde_json::from_slice(&answer).map_err(|e| format!("bad answer from the daemon: {e}"))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        Ok(v)
    } else {
        Err(v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the daemon refused the request")
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_requests() {
        assert_eq!(parse_request(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(br#"{"cmd":"archive","wait":true}"#),
            Ok(Request::Archive { wait: true })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"archive"}"#),
            Ok(Request::Archive { wait: false })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"merge","wait":true}"#),
            Ok(Request::Merge { wait: true })
        );
        for bad in [
            &b""[..],
            b"[]",
            b"{}",
            br#"{"cmd":1}"#,
            br#"{"cmd":"rm -rf"}"#,
            br#"{"cmd":"status","x":1}"#,
            br#"{"cmd":"archive","wait":"yes"}"#,
            br#"{"cmd":"merge","now":true}"#,
            b"\xff\xfe",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
