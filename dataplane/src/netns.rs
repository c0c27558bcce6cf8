//! Work inside another network namespace without moving the caller: a short-lived
//! thread enters the namespace (setns applies to one thread), runs the closure and
//! hands its result back. Sockets it creates stay in that namespace; processes it
//! spawns start there.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use nix::sched::{setns, CloneFlags};

use crate::{Error, Result};

/// Runs `f` on a thread inside the network namespace at `netns` (a `/run/netns/NAME`
/// or `/proc/PID/ns/net` path) and returns what it returned. Blocks the caller until
/// `f` finishes: call it from a blocking context, not on an async worker, unless `f`
/// is short. A missing namespace is [`Error::NoNetns`].
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(netns).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoNetns { path: netns.into() },
        _ => Error::io(format!("opening network namespace {}", netns.display()), e),
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::io(format!("entering network namespace {}", netns.display()), e.into())
            })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::io(
                format!("working in network namespace {}", netns.display()),
                std::io::Error::other("the namespace thread panicked"),
            ))
        })
    })
}
