//! Upgrades without a gap: a new `ambit node --takeover` starts while the old one still
//! holds the instance, opens the same pod listeners (SO_REUSEPORT), re-points the capture
//! map at its own, and only then asks the old process to drain (SIGTERM). The old one keeps
//! its established connections until they end or its drain deadline passes; the new one
//! takes the instance lock when the old one exits.

use std::{fs, os::unix::fs::MetadataExt, path::Path};

use nix::fcntl::{Flock, FlockArg};

/// The process holding the instance lock on `root` (an flock on the directory), from
/// `/proc/locks`: `<n>: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF`.
pub fn lock_holder(root: &Path) -> Option<i32> {
    let meta = fs::metadata(root).ok()?;
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let locks = fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, major, minor, meta.ino())
}

fn holder_in(locks: &str, major: u64, minor: u64, ino: u64) -> Option<i32> {
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "->" marks a waiter, not the holder.
        if f.len() < 6 || f[1] != "FLOCK" || f.contains(&"->") {
            return None;
        }
        let mut id = f[5].split(':');
        let (maj, min, inode) = (id.next()?, id.next()?, id.next()?);
        let same = u64::from_str_radix(maj, 16).ok()? == major
            && u64::from_str_radix(min, 16).ok()? == minor
            && inode.parse::<u64>().ok()? == ino;
        same.then(|| f[4].parse().ok()).flatten()
    })
}

/// Asks the predecessor to drain, then blocks until its lock is free and takes it; the
/// lock is held until this process exits. Run on a blocking thread.
pub fn succeed(root: &Path, predecessor: i32) -> std::io::Result<Flock<fs::File>> {
    let pid = nix::unistd::Pid::from_raw(predecessor);
    match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        Ok(()) => tracing::info!(predecessor, "took over: asked the previous proxy to drain"),
        // Gone already: the lock is free or about to be.
        Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(e.into()),
    }
    let dir = fs::File::open(root)?;
    let lock = Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, e)| std::io::Error::from(e))?;
    tracing::info!(predecessor, "the previous proxy exited: instance lock taken");
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: POSIX  ADVISORY  WRITE 99 00:1a:4242 0 EOF
2: FLOCK  ADVISORY  WRITE 1234 00:2f:777 0 EOF
2: -> FLOCK  ADVISORY  WRITE 5678 00:2f:777 0 EOF
3: FLOCK  ADVISORY  WRITE 4321 00:2f:778 0 EOF
";

    #[test]
    fn the_holder_is_found_by_device_and_inode() {
        assert_eq!(holder_in(LOCKS, 0, 0x2f, 777), Some(1234));
        assert_eq!(holder_in(LOCKS, 0, 0x2f, 778), Some(4321));
        assert_eq!(holder_in(LOCKS, 0, 0x1a, 4242), None, "a POSIX lock is not ours");
        assert_eq!(holder_in(LOCKS, 0, 0x30, 777), None);
    }

    #[test]
    fn our_own_lock_is_visible_in_proc_locks() {
        let dir = std::env::temp_dir().join(format!("ambit-handover-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let lock = Flock::lock(fs::File::open(&dir).expect("open"), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .expect("lock");
        assert_eq!(lock_holder(&dir), Some(std::process::id() as i32));
        drop(lock);
        assert_eq!(lock_holder(&dir), None);
        fs::remove_dir(&dir).expect("cleanup");
    }
}
