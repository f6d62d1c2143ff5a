//! The JSON-lines file: appended by the events thread, one line per event,
//! flushed after each batch. Rotation either by size (`file_max_size`: the
//! file is renamed FILE.1, older ones shifted up to FILE.`file_keep`) or by
//! an external tool (logrotate) followed by SIGHUP, which reopens FILE.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

static REOPEN: AtomicBool = AtomicBool::new(false);

/// Asks the events thread to reopen the file before its next write.
pub fn request_reopen() {
    REOPEN.store(true, Ordering::Relaxed);
}

pub struct FileSink {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max_size: u64,
    keep: u32,
}

fn open(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let size = f.metadata()?.len();
    Ok((BufWriter::with_capacity(256 * 1024, f), size))
}

/// FILE.n
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl FileSink {
    /// Opens (creating, appending) `path`; `max_size` 0 never rotates.
    pub fn open(path: &Path, max_size: u64, keep: u32) -> std::io::Result<FileSink> {
        let (out, size) = open(path)?;
        Ok(FileSink {
            path: path.to_path_buf(),
            out,
            size,
            max_size,
            keep,
        })
    }

    /// Appends one line (the newline is added here).
    pub fn write_line(&mut self, json: &[u8]) -> std::io::Result<()> {
        if REOPEN.swap(false, Ordering::Relaxed) {
            self.reopen()?;
        }
        if self.max_size > 0 && self.size > 0 && self.size + json.len() as u64 + 1 > self.max_size {
            self.rotate()?;
        }
        self.out.write_all(json)?;
        self.out.write_all(b"\n")?;
        self.size += json.len() as u64 + 1;
        Ok(())
    }

    /// Hands the buffered lines to the kernel (after each batch).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let (out, size) = open(&self.path)?;
        self.out = out;
        self.size = size;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = numbered(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, numbered(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
        }
        let (out, size) = open(&self.path)?;
        self.out = out;
        self.size = size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_keeping_n_files_and_no_line_is_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut f = FileSink::open(&path, 100, 2).unwrap();
        let line = [b'x'; 39]; // 40 bytes with the newline
        for _ in 0..10 {
            f.write_line(&line).unwrap();
        }
        f.flush().unwrap();
        let len = |p: &Path| std::fs::read(p).unwrap().len();
        assert_eq!(len(&path), 80, "two lines since the last rotation");
        assert_eq!(len(&numbered(&path, 1)), 80);
        assert_eq!(len(&numbered(&path, 2)), 80);
        assert!(!numbered(&path, 3).exists(), "only file_keep kept");
    }

    #[test]
    fn reopen_follows_an_external_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        let mut f = FileSink::open(&path, 0, 0).unwrap();
        f.write_line(b"one").unwrap();
        f.flush().unwrap();
        std::fs::rename(&path, dir.path().join("old")).unwrap();
        request_reopen();
        f.write_line(b"two").unwrap();
        f.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two\n");
        assert_eq!(std::fs::read(dir.path().join("old")).unwrap(), b"one\n");
    }
}
