//! The result log: the ledger's results, appended to a file of their own beside the
//! database.
//!
//! A result (a run's event, ≈ 2.5 KB of JSON, ≈ 1.6 KB as an LZ4 block) stored in SQLite
//! is written twice, first to the write-ahead log and then, at a checkpoint, to the
//! database, through 1 KB pages with a header and a checksum each, and every checkpoint
//! also rewrites the key-index pages changed since the last one. Appended here it is
//! written once; the run's row keeps only where it starts and how long it is.
//!
//! A record is a CRC-32 (4 bytes, little-endian), then the payload. The CRC covers the
//! record's *owner* (its task and input key, which the run's row holds) and the payload:
//! LZ4 blocks carry no checksum of their own, so a damaged one could decode to other text,
//! and a row that points into a file replaced or cut since (say, restored from an older
//! copy) would otherwise read another input's result.
//!
//! Safety: the bytes of a batch are written and `fdatasync`ed before the transaction that
//! points at them commits, so no committed row, even after a power loss, points past what
//! is on disk. A crash between the two leaves unreferenced bytes at the end, which the next
//! append simply follows. Runs of different pipelines may share a ledger (and this file):
//! an append holds an exclusive lock on the file while it finds the end and writes there.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The results file of the ledger at `ledger`: `ledger.sqlite` → `ledger.results`.
pub fn path_for(ledger: &Path) -> PathBuf {
    ledger.with_extension("results")
}

/// True when `name` is a result log of the ledger whose first log is `first`: `first`
/// itself, or a compaction's copy of it (`first` then `.` and its number, see
/// [`next_name`]).
pub fn is_log_name(first: &str, name: &str) -> bool {
    name == first || copy_number(first, name).is_some()
}

/// The name of the log a compaction of the log named `current` copies into: `first.1`,
/// then `first.2`, and so on.
pub fn next_name(first: &str, current: &str) -> String {
    format!("{first}.{}", copy_number(first, current).unwrap_or(0) + 1)
}

/// N when `name` is `first.N`, the N-th compaction's copy of the log.
fn copy_number(first: &str, name: &str) -> Option<u64> {
    let n = name.strip_prefix(first)?.strip_prefix('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The checksum before each payload.
const CRC_BYTES: usize = 4;

pub struct ResultLog {
    file: File,
    path: PathBuf,
    /// Make appends durable before they are referenced (off for throwaway ledgers).
    sync: bool,
}

impl ResultLog {
    pub fn open(path: PathBuf, sync: bool) -> io::Result<ResultLog> {
        let new = !path.exists();
        let log = Self::with_file(path, sync, false)?;
        // A new file's name must be on disk too before any row points into it.
        if new && sync {
            sync_dir_of(&log.path)?;
        }
        Ok(log)
    }

    /// A new, empty log at `path` (emptied if a file is there already), for a compaction
    /// to copy into.
    pub fn create(path: PathBuf, sync: bool) -> io::Result<ResultLog> {
        Self::with_file(path, sync, true)
    }

    fn with_file(path: PathBuf, sync: bool, truncate: bool) -> io::Result<ResultLog> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .open(&path)?;
        Ok(ResultLog { file, path, sync })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether appends are made durable before they return.
    pub fn syncs(&self) -> bool {
        self.sync
    }

    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// The file's size in bytes.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Makes everything appended so far durable, the file's name included (appends made
    /// with `sync` off are not, on their own).
    pub fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()?;
        sync_dir_of(&self.path)
    }

    /// Appends one record per (owner, payload), in one write, and returns where each
    /// starts and its length. They are on disk when this returns.
    pub fn append(&self, records: &[(&[u8], &[u8])]) -> io::Result<Vec<(u64, usize)>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let size = records.iter().map(|(_, p)| CRC_BYTES + p.len()).sum();
        let mut buf = Vec::with_capacity(size);
        self.file.lock()?;
        let written = (|| -> io::Result<Vec<(u64, usize)>> {
            let start = self.file.metadata()?.len();
            let mut at = Vec::with_capacity(records.len());
            for (owner, p) in records {
                at.push((start + buf.len() as u64, CRC_BYTES + p.len()));
                buf.extend_from_slice(&crc(owner, p).to_le_bytes());
                buf.extend_from_slice(p);
            }
            write_all_at(&self.file, &buf, start)?;
            if self.sync {
                self.file.sync_data()?;
            }
            Ok(at)
        })();
        let unlocked = self.file.unlock();
        let at = written?;
        unlocked?;
        Ok(at)
    }

    /// The payload of `owner`'s record of `len` bytes that starts at `at`, checked.
    pub fn read(&self, owner: &[u8], at: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        read_exact_at(&self.file, &mut buf, at).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => damaged(at, "is cut off (the file is shorter)"),
            _ => e,
        })?;
        check(owner, at, &buf).map(<[u8]>::to_vec)
    }

    /// The payloads of `records` (owner, start, length), checked, in the order given.
    ///
    /// Records that lie close together in the file are read in one go: the results of a
    /// slice of rows were mostly stored in one pass, in about the rows' order, so a slice
    /// of 1024 results takes a few reads instead of 1024.
    pub fn read_many(&self, records: &[(&[u8], u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
        let end_of = |(_, at, len): (&[u8], u64, usize)| at.saturating_add(len as u64);
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_unstable_by_key(|&i| records[i].1);
        let mut out = vec![Vec::new(); records.len()];
        let mut buf = Vec::new();
        let mut first = 0;
        while first < order.len() {
            // One stretch: the records that start within READ_GAP bytes of the end of
            // the one before, up to READ_SPAN bytes in all.
            let start = records[order[first]].1;
            let mut end = end_of(records[order[first]]);
            let mut next = first + 1;
            while let Some(&i) = order.get(next) {
                let r = records[i];
                if r.1 > end.saturating_add(READ_GAP) || end_of(r).max(end) - start > READ_SPAN {
                    break;
                }
                end = end.max(end_of(r));
                next += 1;
            }
            let stretch = &order[first..next];
            buf.resize((end - start) as usize, 0);
            match read_exact_at(&self.file, &mut buf, start) {
                Ok(()) => {
                    for &i in stretch {
                        let (owner, at, len) = records[i];
                        let from = (at - start) as usize;
                        out[i] = check(owner, at, &buf[from..from + len])?.to_vec();
                    }
                }
                // Some record of the stretch runs past the end: read each on its own,
                // so that the error names the one that is cut off.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    for &i in stretch {
                        let (owner, at, len) = records[i];
                        out[i] = self.read(owner, at, len)?;
                    }
                }
                Err(e) => return Err(e),
            }
            first = next;
        }
        Ok(out)
    }
}

/// Records this close after the end of the one before are read together with it (the
/// bytes between are read and dropped).
const READ_GAP: u64 = 4096;
/// The most bytes one read of several records covers.
const READ_SPAN: u64 = 1 << 20;

/// An error naming the record at byte `at` and what is wrong with it.
fn damaged(at: u64, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the result stored at byte {at} {why}; run with --no-cache to fetch it again"),
    )
}

/// The payload of `record` (the record of `owner` that starts at `at`), once its checksum
/// matches.
fn check<'a>(owner: &[u8], at: u64, record: &'a [u8]) -> io::Result<&'a [u8]> {
    if record.len() < CRC_BYTES {
        return Err(damaged(at, "is shorter than its checksum"));
    }
    let (sum, payload) = record.split_at(CRC_BYTES);
    if crc(owner, payload).to_le_bytes() != sum {
        return Err(damaged(
            at,
            "is damaged or not this run's (its checksum does not match)",
        ));
    }
    Ok(payload)
}

fn crc(owner: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(owner.len() as u32).to_le_bytes());
    h.update(owner);
    h.update(payload);
    h.finalize()
}

/// Makes the name of the file at `path` durable in its folder (the current folder for a
/// bare file name).
pub(crate) fn sync_dir_of(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(unix)]
pub(crate) fn write_all_at(file: &File, buf: &[u8], at: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, at)
}

#[cfg(unix)]
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(windows)]
pub(crate) fn write_all_at(file: &File, mut buf: &[u8], mut at: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_write(buf, at)?;
        buf = &buf[n..];
        at += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
pub(crate) fn read_exact_at(file: &File, mut buf: &mut [u8], mut at: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, at)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_follow_the_end_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("ledger.sqlite"));
        assert_eq!(path.file_name().unwrap(), "ledger.results");
        let a = ResultLog::open(path.clone(), true).unwrap();
        let at = a.append(&[(b"k1", b"one"), (b"k2", b"three")]).unwrap();
        assert_eq!(at, vec![(0, 7), (7, 9)]);
        // A second handle (another pipeline sharing the ledger) appends after the first.
        let b = ResultLog::open(path.clone(), false).unwrap();
        assert_eq!(b.append(&[(b"k3", b"x")]).unwrap(), vec![(16, 5)]);
        assert!(a.append(&[]).unwrap().is_empty());
        assert_eq!(a.read(b"k2", 7, 9).unwrap(), b"three");
        assert_eq!(a.read(b"k3", 16, 5).unwrap(), b"x");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 21);
        assert_eq!(&bytes[4..7], b"one");
        // Past the end, a flipped bit, or another owner's record: an error that says
        // where, never other bytes.
        let e = a.read(b"k3", 16, 6).unwrap_err().to_string();
        assert!(e.contains("byte 16") && e.contains("cut off"), "{e}");
        let e = a.read(b"k1", 7, 9).unwrap_err().to_string();
        assert!(e.contains("byte 7") && e.contains("checksum"), "{e}");
        let mut damaged = bytes.clone();
        damaged[10] ^= 1;
        std::fs::write(&path, damaged).unwrap();
        let e = a.read(b"k2", 7, 9).unwrap_err().to_string();
        assert!(e.contains("byte 7") && e.contains("checksum"), "{e}");
        assert_eq!(a.read(b"k1", 0, 7).unwrap(), b"one");
    }

    #[test]
    fn many_records_are_read_in_stretches_and_come_back_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let log = ResultLog::open(path_for(&dir.path().join("ledger.sqlite")), false).unwrap();
        // 300 records of 1–9 KB: with the gaps left by the ones not asked for, the reads
        // cover several stretches, and some break at READ_SPAN.
        let owners: Vec<Vec<u8>> = (0..300).map(|i| format!("k{i}").into_bytes()).collect();
        let payloads: Vec<Vec<u8>> = (0..300)
            .map(|i| vec![(i % 251) as u8; 1000 + (i * 37) % 8000])
            .collect();
        let records: Vec<(&[u8], &[u8])> = owners
            .iter()
            .zip(&payloads)
            .map(|(o, p)| (o.as_slice(), p.as_slice()))
            .collect();
        let at = log.append(&records).unwrap();
        // Every third record is skipped, the rest asked for backwards, one of them twice.
        let mut asked: Vec<usize> = (0..300).rev().filter(|i| i % 3 != 0).collect();
        asked.push(100);
        let wanted: Vec<(&[u8], u64, usize)> = asked
            .iter()
            .map(|&i| (owners[i].as_slice(), at[i].0, at[i].1))
            .collect();
        let got = log.read_many(&wanted).unwrap();
        assert_eq!(got.len(), asked.len());
        for (&i, p) in asked.iter().zip(&got) {
            assert_eq!(p, &payloads[i], "record {i}");
        }
        assert!(log.read_many(&[]).unwrap().is_empty());

        // A damaged record amid a stretch is named by where it starts.
        let path = log.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at[200].0 as usize + 10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = log.read_many(&wanted).unwrap_err().to_string();
        assert!(
            e.contains(&format!("byte {}", at[200].0)) && e.contains("checksum"),
            "{e}"
        );
        // So is one cut off by a shorter file, though its stretch starts before it.
        bytes.truncate(at[299].0 as usize + 50);
        std::fs::write(&path, &bytes).unwrap();
        let tail: Vec<(&[u8], u64, usize)> = (297..300)
            .map(|i| (owners[i].as_slice(), at[i].0, at[i].1))
            .collect();
        let e = log.read_many(&tail).unwrap_err().to_string();
        assert!(
            e.contains(&format!("byte {}", at[299].0)) && e.contains("cut off"),
            "{e}"
        );
    }
}
