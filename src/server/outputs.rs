//! Run outputs, appended to a file of their own beside the database (`<db>-outputs`).
//!
//! An output (≈ 2.6 KB of JSON from the sim) kept in SQLite is written twice, first to the
//! write-ahead log and then, at a checkpoint, to the database; with latency 0 the commits
//! and the checkpoints together took a fifth of the server's CPU. Appended here it is
//! written once, and the run's row keeps only where it starts and how long it is.
//!
//! The file starts with a header: 8 bytes of magic, then the *synced mark*, the length up to
//! which the file is known to be on disk. A record is a CRC-32 of the run's sequence number
//! and its output, then the output.
//!
//! Safety: the database commits without syncing (`synchronous = NORMAL`), and this file is
//! not synced at each commit either, so a power loss may keep a commit whose outputs never
//! reached the disk. The file is therefore synced, and its mark moved, before each of the
//! store's own checkpoints and when the store closes, and each commit that adds outputs
//! also records in the database where the file then ends. When a store opens and the
//! database says the file goes on past its mark (or past its length: the file may be
//! missing or cut), every output from there on is checked, and a run whose output is cut
//! off or damaged is queued again, to run as if the power loss had taken its commit too.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::ledger::log::{read_exact_at, sync_dir_of, write_all_at};

const MAGIC: &[u8; 8] = b"gfouts\x00\x01";
/// Magic, then the synced mark (u64, little-endian).
const HEADER_BYTES: u64 = 16;
/// The checksum before each output.
pub const CRC_BYTES: u64 = 4;

/// The outputs file of the database at `db`: `state.sqlite` → `state.sqlite-outputs`.
pub fn path_for(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-outputs");
    PathBuf::from(name)
}

/// Bytes read at once when records are read in the order they were written.
const WINDOW: u64 = 256 << 10;

/// What [`Outputs::read`] keeps between reads: the bytes it read last, from where, and
/// where the last record it returned ends.
#[derive(Default)]
pub struct ReadBuf {
    start: u64,
    bytes: Vec<u8>,
    next: u64,
}

pub struct Outputs {
    file: File,
    path: PathBuf,
    /// Sync before moving the mark (off for a temporary store).
    durable: bool,
}

/// An opened outputs file: where appends go, and up to where it is known to be on disk.
pub struct Opened {
    pub outputs: Outputs,
    pub end: u64,
    pub mark: u64,
}

impl Outputs {
    /// Opens the file at `path`, creating it (with its header) if it is not there.
    pub fn open(path: PathBuf, durable: bool) -> io::Result<Opened> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let outputs = Outputs {
            file,
            path,
            durable,
        };
        let mut end = outputs.file.metadata()?.len();
        if end < HEADER_BYTES {
            // New, or cut off before its header was whole: nothing in it can be referenced.
            let mut header = MAGIC.to_vec();
            header.extend_from_slice(&HEADER_BYTES.to_le_bytes());
            write_all_at(&outputs.file, &header, 0)?;
            if durable {
                outputs.file.sync_all()?;
                sync_dir_of(&outputs.path)?;
            }
            end = HEADER_BYTES;
        }
        let mut header = [0u8; HEADER_BYTES as usize];
        read_exact_at(&outputs.file, &mut header, 0)?;
        if &header[..8] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a groupflow outputs file (its first bytes are not the expected ones)",
            ));
        }
        let mark = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        Ok(Opened { outputs, end, mark })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds the record of run `seq`'s `output` to `buf`, which is to be written at `at`;
    /// returns where the record starts.
    pub fn encode(buf: &mut Vec<u8>, at: u64, seq: i64, output: &str) -> u64 {
        let start = at + buf.len() as u64;
        buf.extend_from_slice(&crc(seq, output.as_bytes()).to_le_bytes());
        buf.extend_from_slice(output.as_bytes());
        start
    }

    /// Writes records made by [`Outputs::encode`] at `at`.
    pub fn write(&self, buf: &[u8], at: u64) -> io::Result<()> {
        write_all_at(&self.file, buf, at)
    }

    /// Run `seq`'s output of `len` bytes, in the record that starts at `at`, checked. A
    /// record that starts where the last one read through `rb` ended is most likely followed
    /// by the next one (a page of a group's runs, written in about the order they finished),
    /// so [`WINDOW`] bytes are read ahead then, and the records they hold cost no read of
    /// their own; any other record is read alone.
    pub fn read<'a>(
        &self,
        seq: i64,
        at: u64,
        len: u64,
        rb: &'a mut ReadBuf,
    ) -> io::Result<&'a str> {
        let damaged = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the output of run {seq} at byte {at} {why}"),
            )
        };
        let size = CRC_BYTES + len;
        let end = at + size;
        if at < rb.start || end > rb.start + rb.bytes.len() as u64 {
            let mut want = size;
            if at == rb.next && size < WINDOW {
                let file_len = self.file.metadata()?.len();
                want = WINDOW.min(file_len.saturating_sub(at)).max(size);
            }
            rb.bytes.resize(want as usize, 0);
            rb.start = at;
            if let Err(e) = read_exact_at(&self.file, &mut rb.bytes, at) {
                rb.bytes.clear();
                return Err(match e.kind() {
                    io::ErrorKind::UnexpectedEof => damaged("is cut off (the file is shorter)"),
                    _ => e,
                });
            }
        }
        rb.next = end;
        let from = (at - rb.start) as usize;
        let (sum, output) = rb.bytes[from..from + size as usize].split_at(CRC_BYTES as usize);
        if crc(seq, output).to_le_bytes() != sum {
            return Err(damaged("is damaged (its checksum does not match)"));
        }
        std::str::from_utf8(output).map_err(|_| damaged("is not UTF-8"))
    }

    /// Syncs the file and moves its mark to the length it had before the sync. Appends
    /// that race with this stay past the mark.
    pub fn sync_mark(&self) -> io::Result<()> {
        if !self.durable {
            return Ok(());
        }
        let len = self.file.metadata()?.len();
        self.file.sync_data()?;
        // Written only once the bytes before it are on disk; an 8-byte aligned write within
        // the first sector lands whole or not at all.
        write_all_at(&self.file, &len.to_le_bytes(), 8)
    }

    /// [`Outputs::sync_mark`], with a failure logged: the next open checks more records.
    pub fn sync_mark_or_warn(&self) {
        if let Err(e) = self.sync_mark() {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot sync the outputs file");
        }
    }
}

fn crc(seq: i64, output: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(output);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_checked_and_the_mark_follows_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("state.sqlite"));
        assert_eq!(path.file_name().unwrap(), "state.sqlite-outputs");
        let opened = Outputs::open(path.clone(), true).unwrap();
        assert_eq!((opened.end, opened.mark), (HEADER_BYTES, HEADER_BYTES));
        let o = opened.outputs;
        let mut buf = Vec::new();
        let a = Outputs::encode(&mut buf, opened.end, 7, "{\"a\":1}");
        let b = Outputs::encode(&mut buf, opened.end, 9, "héllo");
        assert_eq!(a, HEADER_BYTES);
        assert_eq!(b, HEADER_BYTES + CRC_BYTES + 7);
        o.write(&buf, opened.end).unwrap();
        let mut out = ReadBuf::default();
        assert_eq!(o.read(7, a, 7, &mut out).unwrap(), "{\"a\":1}");
        assert_eq!(o.read(9, b, 6, &mut out).unwrap(), "héllo");
        // Another run's sequence number, a wrong place, or a cut-off file fail the check.
        assert!(
            o.read(8, a, 7, &mut out)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        assert!(o.read(9, a, 7, &mut out).is_err());
        assert!(
            o.read(9, b, 60, &mut out)
                .unwrap_err()
                .to_string()
                .contains("cut off")
        );
        // The mark moves to the end only once synced.
        let end = HEADER_BYTES + buf.len() as u64;
        assert_eq!(
            Outputs::open(path.clone(), true).unwrap().mark,
            HEADER_BYTES
        );
        o.sync_mark().unwrap();
        drop(o);
        let again = Outputs::open(path.clone(), true).unwrap();
        assert_eq!((again.end, again.mark), (end, end));
        drop(again);
        // A byte changed in a record is found.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        write_all_at(&f, b"H", b + CRC_BYTES).unwrap();
        let again = Outputs::open(path.clone(), false).unwrap();
        let mut out = ReadBuf::default();
        assert!(again.outputs.read(9, b, 6, &mut out).is_err());
        assert_eq!(again.outputs.read(7, a, 7, &mut out).unwrap(), "{\"a\":1}");

        std::fs::write(&path, b"not an outputs file").unwrap();
        let err = Outputs::open(path, true).err().unwrap();
        assert!(err.to_string().contains("not a groupflow outputs file"));
    }

    #[test]
    fn records_read_in_any_order_across_read_ahead_windows() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outputs::open(dir.path().join("x-outputs"), false).unwrap();
        let o = opened.outputs;
        // 300 outputs of 2–3 KB: about three windows' worth, records straddling their ends.
        let texts: Vec<String> = (0..300)
            .map(|i| format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(2000 + i * 3)))
            .collect();
        let mut buf = Vec::new();
        let at: Vec<u64> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Outputs::encode(&mut buf, opened.end, i as i64, t))
            .collect();
        o.write(&buf, opened.end).unwrap();
        let order: Vec<usize> = (0..300)
            .chain((0..300).rev())
            .chain((0..300).map(|i| (i * 7919) % 300))
            .collect();
        let mut rb = ReadBuf::default();
        for i in order {
            let got = o
                .read(i as i64, at[i], texts[i].len() as u64, &mut rb)
                .unwrap();
            assert_eq!(got, texts[i], "record {i}");
        }
        // The last record, read ahead of the file's end, and a record past it.
        let last = at[299] + CRC_BYTES + texts[299].len() as u64;
        assert!(o.read(300, last, 10, &mut rb).is_err());
    }
}
