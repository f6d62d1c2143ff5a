//! Process resource limits the relay needs at start-up.
//!
//! Every client and every outbound connection holds a file descriptor; the
//! usual soft limit (1024) would make `accept` fail with EMFILE long before the
//! listeners' `max_connections`. The hard limit is what the administrator
//! allows (systemd `LimitNOFILE`), so the relay raises its soft limit to it.

/// Soft and hard RLIMIT_NOFILE before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileChange {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// Raises the soft open-files limit to the hard limit.
pub fn raise_nofile() -> std::io::Result<NofileChange> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct; raising soft up to hard
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(NofileChange {
        before,
        after: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_ends_at_the_hard_limit() {
        let c = raise_nofile().expect("rlimit");
        assert_eq!(c.after, c.hard);
        assert!(c.before <= c.after);
        // Idempotent.
        assert_eq!(raise_nofile().expect("rlimit").before, c.hard);
    }
}
