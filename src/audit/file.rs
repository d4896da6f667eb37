//! The audit log's file: rotation by size and age, retention, optional gzip, and reopening
//! for an outside rotator (logrotate moves the file, then sends SIGHUP).
//!
//! A rotated file is renamed beside the live one with the UTC time of its rotation,
//! `tollgate-audit.jsonl.20261130T231500.123Z`, which sorts oldest first; compressed, it gains
//! `.gz`. Only the `keep` newest rotated files stay. Lines are never split across files: a
//! rotation happens between two records.
//!
//! The directory may be shared: no open follows a symlink, the gzip is written to a file that
//! must not exist yet, and retention counts (and deletes) only files named exactly as a rotation
//! names them and owned by the live file's owner. A rotated file is compressed at the next
//! rotation, not at once: during a binary upgrade the old process may still append to it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// When the live file is rotated, and what is kept.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Rotate before a record would take the file past this size; 0, never by size.
    pub max_bytes: u64,
    /// Rotate a file that has records and is this old; none, never by age.
    pub every: Option<Duration>,
    /// Rotated files kept, the newest.
    pub keep: usize,
    /// Gzip rotated files, on a thread of their own.
    pub compress: bool,
}

pub struct LogFile {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    opened: Instant,
    rotation: Rotation,
    compressor: Option<Compressor>,
    /// The last rotated file, compressed at the next rotation (or at close).
    to_compress: Option<PathBuf>,
    /// After a failed rotation, the next try waits until then; records go on to the open file.
    retry_at: Option<Instant>,
}

/// A failed rotation is tried again this much later.
const ROTATE_RETRY: Duration = Duration::from_secs(60);

fn open_append(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot open audit log {}: {e}", path.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((BufWriter::with_capacity(256 << 10, file), len))
}

impl LogFile {
    pub fn open(path: &Path, rotation: Rotation) -> std::io::Result<Self> {
        let (out, written) = open_append(path)?;
        let compressor = if rotation.compress { Some(Compressor::start(path, rotation.keep)?) } else { None };
        Ok(LogFile {
            path: path.to_path_buf(),
            out,
            written,
            opened: Instant::now(),
            rotation,
            compressor,
            to_compress: None,
            retry_at: None,
        })
    }

    /// Writes one whole line (with its newline), rotating first if it would not fit. A
    /// rotation that fails does not cost the record: it goes to the file open now.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let max = self.rotation.max_bytes;
        if self.written > 0 && max > 0 && self.written + line.len() as u64 > max {
            self.try_rotate();
        }
        self.out.write_all(line)?;
        self.written += line.len() as u64;
        Ok(())
    }

    /// Rotates a file with records that has reached its age.
    pub fn tick(&mut self) {
        if self.written > 0 && self.rotation.every.is_some_and(|e| self.opened.elapsed() >= e) {
            self.try_rotate();
        }
    }

    fn try_rotate(&mut self) {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match self.rotate() {
            Ok(()) => self.retry_at = None,
            Err(e) => {
                tracing::error!(error = %e, "cannot rotate the audit log; records go on to the open file, next try in a minute");
                self.retry_at = Some(Instant::now() + ROTATE_RETRY);
            }
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// Opens the path again: after an outside rotator moved the file, records go to a new
    /// one there.
    pub fn reopen(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let (out, written) = open_append(&self.path)?;
        self.out = out;
        self.written = written;
        self.opened = Instant::now();
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let target = self.free_rotated_name();
        // A file an outside rotator already moved is simply not there: start a new one.
        let moved = match std::fs::rename(&self.path, &target) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot rotate audit log {} to {}: {e}", self.path.display(), target.display()),
                ))
            }
        };
        self.reopen()?;
        if moved && self.compressor.is_some() {
            if let (Some(c), Some(previous)) = (&self.compressor, self.to_compress.replace(target)) {
                c.send(previous);
            }
        }
        self.prune();
        Ok(())
    }

    fn free_rotated_name(&self) -> PathBuf {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
        let base = format!("{}.{stamp}", self.path.display());
        // Two rotations within a millisecond (tiny size caps): a suffix keeps them apart and
        // still sorts after the first.
        (0..)
            .map(|n| if n == 0 { PathBuf::from(&base) } else { PathBuf::from(format!("{base}-{n:03}")) })
            .find(|p| !p.exists() && !gz(p).exists())
            .expect("some name is free")
    }

    fn prune(&self) {
        prune(&self.path, self.rotation.keep);
    }

    /// Compresses the last rotated file and waits for the compressions.
    pub fn close(mut self) {
        let _ = self.out.flush();
        if let Some(c) = self.compressor.take() {
            if let Some(last) = self.to_compress.take() {
                c.send(last);
            }
            c.finish();
        }
    }
}

/// Deletes rotated files of `live` beyond the `keep` newest (compressed or not).
fn prune(live: &Path, keep: usize) {
    let mut generations = rotated_files(live);
    if generations.len() <= keep {
        return;
    }
    let excess = generations.len() - keep;
    for old in generations.drain(..excess) {
        for p in [gz(&old), old] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(file = %p.display(), error = %e, "cannot remove an old audit log"),
            }
        }
    }
}

fn gz(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".gz");
    PathBuf::from(s)
}

/// The rotated files of `live`, oldest first, each once (without `.gz`): files named exactly as
/// a rotation names them, owned by the live file's owner.
pub fn rotated_files(live: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dir = match live.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = live.file_name().and_then(|n| n.to_str()) else { return Vec::new() };
    let Ok(owner) = std::fs::symlink_metadata(live).map(|m| m.uid()) else { return Vec::new() };
    let prefix = format!("{name}.");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let stamp = n.strip_prefix(&prefix)?;
            let stamp = stamp.strip_suffix(".gz").unwrap_or(stamp);
            let meta = e.metadata().ok()?;
            (is_stamp(stamp) && meta.is_file() && meta.uid() == owner).then(|| dir.join(format!("{prefix}{stamp}")))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// `20261130T231500.123Z`, or with `-001`: a real time, as [`LogFile::rotate`] writes it.
fn is_stamp(s: &str) -> bool {
    let (time, suffix) = match s.get(..20) {
        Some(t) => (t, &s[20..]),
        None => return false,
    };
    let suffix_ok = suffix.is_empty()
        || (suffix.len() == 4 && suffix.starts_with('-') && suffix[1..].bytes().all(|b| b.is_ascii_digit()));
    suffix_ok && chrono::NaiveDateTime::parse_from_str(time, "%Y%m%dT%H%M%S%.3fZ").is_ok()
}

/// Gzips rotated files one after another, off the writer's thread: a large file takes
/// seconds, and records keep arriving meanwhile.
struct Compressor {
    queue: mpsc::Sender<PathBuf>,
    thread: JoinHandle<()>,
}

impl Compressor {
    fn start(live: &Path, keep: usize) -> std::io::Result<Self> {
        let (queue, files) = mpsc::channel::<PathBuf>();
        let live = live.to_path_buf();
        let thread = crate::background::spawn("tollgate-audit-gzip", move || {
            for file in files {
                if let Err(e) = compress(&file) {
                    tracing::warn!(file = %file.display(), error = %e, "cannot compress a rotated audit log; it stays as it is");
                }
                // A file pruned while it was being compressed leaves its `.gz` behind: prune
                // again once the `.gz` is there.
                prune(&live, keep);
            }
        })?;
        Ok(Compressor { queue, thread })
    }

    fn send(&self, file: PathBuf) {
        let _ = self.queue.send(file);
    }

    fn finish(self) {
        drop(self.queue);
        let _ = self.thread.join();
    }
}

/// `file` to `file.gz`, written beside as `.gz.tmp` and renamed once whole, then `file`
/// removed: a crash leaves one complete copy or the other.
fn compress(file: &Path) -> std::io::Result<()> {
    let mut input = match File::open(file) {
        Ok(f) => f,
        // Pruned before its turn came.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let done = gz(file);
    let mut tmp = done.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // Never an existing file, nor through a symlink someone placed there.
    let created = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let written = (|| {
        let mut encoder = flate2::write::GzEncoder::new(BufWriter::new(created), flate2::Compression::fast());
        std::io::copy(&mut input, &mut encoder)?;
        let out = encoder.finish()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &done)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_rotation_s_own_names_count() {
        assert!(is_stamp("20261130T231500.123Z"));
        assert!(is_stamp("20261130T231500.123Z-001"));
        for bad in
            ["99999999T999999.999Z", "20261130T231500.123Z.gz.tmp", "20261130T231500.123Z-1", "20261130T2315", ""]
        {
            assert!(!is_stamp(bad), "{bad}");
        }
    }

    #[test]
    fn retention_ignores_planted_and_foreign_names() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("a.jsonl");
        std::fs::write(&live, "").unwrap();
        for name in [
            "a.jsonl.20261130T231500.123Z",
            "a.jsonl.20261130T231501.000Z.gz",
            "a.jsonl.99999999T999999.999Z",
            "a.jsonl.20261130T231502.000Z.gz.tmp",
            "b.jsonl.20261130T231500.123Z",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::os::unix::fs::symlink(&live, dir.path().join("a.jsonl.20261130T231503.000Z")).unwrap();
        let found: Vec<String> =
            rotated_files(&live).iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(found, ["a.jsonl.20261130T231500.123Z", "a.jsonl.20261130T231501.000Z"]);
    }

    #[test]
    fn the_gzip_never_writes_through_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let rotated = dir.path().join("a.jsonl.20261130T231500.123Z");
        std::fs::write(&rotated, "{}\n").unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("a.jsonl.20261130T231500.123Z.gz.tmp")).unwrap();
        assert!(compress(&rotated).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(rotated.exists(), "the rotated file stays as it is");
    }
}
