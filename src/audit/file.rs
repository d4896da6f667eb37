//! The audit log's file: rotation by size and age, retention, optional gzip, and reopening
//! for an outside rotator (logrotate moves the file, then sends SIGHUP).
//!
//! A rotated file is renamed beside the live one with the UTC time of its rotation,
//! `tollgate-audit.jsonl.20261130T231500.123Z`, which sorts oldest first; compressed, it gains
//! `.gz`. Only the `keep` newest rotated files stay. Lines are never split across files: a
//! rotation happens between two records.

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
}

fn open_append(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot open audit log {}: {e}", path.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((BufWriter::with_capacity(256 << 10, file), len))
}

impl LogFile {
    pub fn open(path: &Path, rotation: Rotation) -> std::io::Result<Self> {
        let (out, written) = open_append(path)?;
        let compressor = if rotation.compress { Some(Compressor::start()?) } else { None };
        Ok(LogFile { path: path.to_path_buf(), out, written, opened: Instant::now(), rotation, compressor })
    }

    /// Writes one whole line (with its newline), rotating first if it would not fit.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let max = self.rotation.max_bytes;
        if self.written > 0 && max > 0 && self.written + line.len() as u64 > max {
            self.rotate()?;
        }
        self.out.write_all(line)?;
        self.written += line.len() as u64;
        Ok(())
    }

    /// Rotates a file with records that has reached its age.
    pub fn tick(&mut self) -> std::io::Result<()> {
        if self.written > 0 && self.rotation.every.is_some_and(|e| self.opened.elapsed() >= e) {
            self.rotate()?;
        }
        Ok(())
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
        if moved {
            if let Some(c) = &self.compressor {
                c.send(target);
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

    /// Deletes rotated files beyond the `keep` newest (compressed or not).
    fn prune(&self) {
        let mut generations = rotated_files(&self.path);
        if generations.len() <= self.rotation.keep {
            return;
        }
        let excess = generations.len() - self.rotation.keep;
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

    /// Waits for the files being compressed.
    pub fn close(mut self) {
        let _ = self.out.flush();
        if let Some(c) = self.compressor.take() {
            c.finish();
        }
    }
}

fn gz(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".gz");
    PathBuf::from(s)
}

/// The rotated files of `live`, oldest first, each once (without `.gz`).
pub fn rotated_files(live: &Path) -> Vec<PathBuf> {
    let dir = match live.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = live.file_name().and_then(|n| n.to_str()) else { return Vec::new() };
    let prefix = format!("{name}.");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let stamp = n.strip_prefix(&prefix)?;
            let stamp = stamp.strip_suffix(".gz").unwrap_or(stamp);
            // `20261130T231500.123Z`, maybe `-001`: a rotation's name, nothing else.
            let stamped = stamp.len() >= 20
                && stamp.as_bytes()[8] == b'T'
                && stamp.as_bytes()[19] == b'Z'
                && stamp[..8].bytes().all(|b| b.is_ascii_digit());
            stamped.then(|| dir.join(format!("{prefix}{stamp}")))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Gzips rotated files one after another, off the writer's thread: a large file takes
/// seconds, and records keep arriving meanwhile.
struct Compressor {
    queue: mpsc::Sender<PathBuf>,
    thread: JoinHandle<()>,
}

impl Compressor {
    fn start() -> std::io::Result<Self> {
        let (queue, files) = mpsc::channel::<PathBuf>();
        let thread = std::thread::Builder::new().name("tollgate-audit-gzip".into()).spawn(move || {
            for file in files {
                if let Err(e) = compress(&file) {
                    tracing::warn!(file = %file.display(), error = %e, "cannot compress a rotated audit log; it stays as it is");
                }
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
    let mut encoder = flate2::write::GzEncoder::new(BufWriter::new(File::create(&tmp)?), flate2::Compression::fast());
    std::io::copy(&mut input, &mut encoder)?;
    let out = encoder.finish()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, &done)?;
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
