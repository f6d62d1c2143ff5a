//! Free space on the spool's filesystem, to tell a full disk from a failing one.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Room for LMDB's own pages (branch, leaf, freelist, meta) on top of the
/// record bytes of a transaction.
pub(crate) const SHORT_WRITE_SLACK: u64 = 1 << 20;

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`;
/// None when the filesystem cannot even say (itself a sign of failure).
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and
    // statvfs(3) only writes into the buffer we pass.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the whole struct.
    let st = unsafe { st.assume_init() };
    // fsblkcnt_t and c_ulong are 32 bits on some targets.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Some(blocks.saturating_mul(size))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_real_directory_has_some_space_and_a_missing_one_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(super::free_bytes(dir.path()).is_some_and(|n| n > 0));
        assert_eq!(super::free_bytes(&dir.path().join("missing")), None);
    }
}
