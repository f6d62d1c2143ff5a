//! Process resource limits the relay needs at start-up.
//!
//! Every client and every outbound connection holds a file descriptor; the
//! usual soft limit (1024) would make `accept` fail with EMFILE long before the
//! listeners' `max_connections`. The hard limit is what the administrator
//! allows (systemd `LimitNOFILE`), so the relay raises its soft limit to it.
//! io_uring needs locked memory and a kernel that allows it: both are checked
//! before any executor starts, so the error says how to fix them.

use anyhow::anyhow;

/// Soft and hard RLIMIT_NOFILE before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileChange {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// The soft and hard limits of `resource`.
fn getrlimit(resource: libc::__rlimit_resource_t) -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit struct we own.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
}

/// Raises the soft open-files limit to the hard limit.
pub fn raise_nofile() -> std::io::Result<NofileChange> {
    let mut lim = getrlimit(libc::RLIMIT_NOFILE)?;
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

/// glommio refuses to start an executor below this RLIMIT_MEMLOCK.
const MIN_MEMLOCK: libc::rlim_t = 512 * 1024;

/// How to give the relay locked memory, for every error that lacks it.
const MEMLOCK_FIX: &str = "raise the locked-memory limit: LimitMEMLOCK=infinity in the \
     systemd unit, or `ulimit -l unlimited` (as root) in the shell that starts sluice; \
     at least cores x 3 x server.io_memory + 16 MiB (README \"Production box\")";

/// Fails early, with the fix, when glommio would refuse the locked-memory limit.
pub fn check_memlock() -> anyhow::Result<()> {
    match getrlimit(libc::RLIMIT_MEMLOCK) {
        Ok(lim) => memlock_verdict(lim.rlim_cur),
        Err(_) => Ok(()), // Unknown: glommio checks again.
    }
}

fn memlock_verdict(soft: libc::rlim_t) -> anyhow::Result<()> {
    if soft != libc::RLIM_INFINITY && soft < MIN_MEMLOCK {
        return Err(anyhow!(
            "the locked-memory limit (RLIMIT_MEMLOCK) is {} KiB; io_uring needs at least {} KiB: {MEMLOCK_FIX}",
            soft / 1024,
            MIN_MEMLOCK / 1024
        ));
    }
    Ok(())
}

/// Fails early, with the cause, when the kernel will not make an io_uring
/// (glommio would panic in every executor with a message about old kernels).
pub fn check_io_uring() -> anyhow::Result<()> {
    // struct io_uring_params: 120 bytes; all zero asks for the defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) reads and writes only `params`, a buffer we own
    // of the kernel's struct size; the descriptor it returns is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return io_uring_verdict(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is the descriptor io_uring_setup just returned, used nowhere else.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

fn io_uring_verdict(e: std::io::Error) -> anyhow::Result<()> {
    match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) => Err(anyhow!(
            "io_uring is not available (io_uring_setup: {e}): {IO_URING_FIX}"
        )),
        // Anything else (ENOMEM, say) is for glommio to report in context.
        _ => Ok(()),
    }
}

const IO_URING_FIX: &str = "sluice needs Linux 5.8 or later with io_uring allowed \
     (sysctl kernel.io_uring_disabled = 0; in a container, a seccomp profile that \
     permits io_uring_setup, io_uring_enter and io_uring_register)";

/// What to do about an executor that failed to start, when its error says so:
/// locked memory (glommio's `MemLockLimit`, or ENOMEM registering buffers) or
/// io_uring missing (ENOSYS; EPERM from a seccomp filter or
/// kernel.io_uring_disabled).
pub fn startup_hint(error: &str) -> Option<String> {
    if error.contains("MemLockLimit") || error.contains("Cannot allocate memory") {
        Some(MEMLOCK_FIX.to_string())
    } else if error.contains("os error 38") || error.contains("os error 1)") {
        Some(format!("io_uring is not available? {IO_URING_FIX}"))
    } else {
        None
    }
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

    #[test]
    fn memlock_errors_say_how_to_fix_them() {
        let e = memlock_verdict(64 * 1024).expect_err("64 KiB is too little");
        let e = e.to_string();
        assert!(e.contains("64 KiB") && e.contains("512 KiB"), "{e}");
        assert!(e.contains("LimitMEMLOCK") && e.contains("ulimit -l"), "{e}");
        assert!(memlock_verdict(512 * 1024).is_ok());
        assert!(memlock_verdict(libc::RLIM_INFINITY).is_ok());

        let hint = startup_hint("IO error occurred: MemLockLimit(65536/524288)").expect("hint");
        assert!(hint.contains("LimitMEMLOCK"), "{hint}");
        let hint = startup_hint("Function not implemented (os error 38)").expect("hint");
        assert!(hint.contains("io_uring"), "{hint}");
        assert_eq!(startup_hint("address in use"), None);

        let e = io_uring_verdict(std::io::Error::from_raw_os_error(libc::ENOSYS))
            .expect_err("ENOSYS: no io_uring");
        let e = e.to_string();
        assert!(
            e.contains("io_uring is not available") && e.contains("5.8"),
            "{e}"
        );
        assert!(io_uring_verdict(std::io::Error::from_raw_os_error(libc::EPERM)).is_err());
        assert!(io_uring_verdict(std::io::Error::from_raw_os_error(libc::ENOMEM)).is_ok());
        // On this machine the check passes (every other test needs io_uring).
        check_io_uring().expect("io_uring available");
    }
}
