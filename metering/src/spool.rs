//! A durable local spool for usage events that could not reach Postgres.
//!
//! When Postgres is down or slow, or the in-memory usage channel is full,
//! events go here instead of being dropped; the writer task drains the spool
//! into Postgres once it can. Payloads are opaque bytes (the caller serialises
//! each event as JSON).
//!
//! # File format
//!
//! One append-only file, `usage.spool`, in the directory given to
//! [`Spool::open`]. Each record is framed as
//!
//! ```text
//! [u32 LE payload length][u32 LE crc32 of (length bytes ++ payload)][payload]
//! ```
//!
//! The checksum covers the length field as well as the payload. With a
//! payload-only checksum, eight zero bytes would be a valid empty record
//! (crc32 of nothing is 0), and a file tail zero-filled by a power loss (the
//! size reached disk before the data did) would replay as a stream of bogus
//! events. crc32 of four zero bytes is not zero, so such a tail is rejected.
//!
//! # Durability (fsync policy)
//!
//! - A record handed to [`Spool::append`] survives a *process* crash (SIGKILL,
//!   panic=abort, OOM kill) as soon as `append` returns: the bytes are in the
//!   kernel's page cache.
//! - It survives *power loss or a kernel crash* once [`Spool::sync`] has run
//!   (`fdatasync`) after that append. `append` itself never syncs, so the
//!   request path (which appends on overflow) never waits for the disk.
//! - The writer task calls `sync` after each batch it spools, and so also makes
//!   durable whatever overflow appends came before.
//! - `open` fsyncs the directory, so a newly created spool file's directory
//!   entry is durable too, and syncs quarantine files before it shrinks the
//!   spool, so invalid bytes are always on disk in one place or the other.
//!
//! # Replays are by design
//!
//! The read cursor lives only in memory. [`Spool::read_batch`] returns records
//! without consuming them; the writer inserts them into Postgres and only then
//! calls [`Spool::consume`]. A crash between the insert and `consume`, or any
//! restart before a fully drained spool was truncated, means those records are
//! read again from the start at the next `open`. That is harmless: the Postgres
//! insert is idempotent on the event id. Losing a record is not harmless,
//! which is why every choice here errs towards reading a record twice.
//!
//! # Recovery at open
//!
//! `open` scans the whole file and stops at the first invalid record:
//!
//! - a record cut short by end of file is a *torn tail* (a crash during a
//!   write), logged as a warning;
//! - a bad checksum or an impossible length is *corruption*, logged as an
//!   error.
//!
//! In both cases the bytes from the invalid record to the end are copied to
//! `usage.spool.torn-<unix_millis>` or `usage.spool.corrupt-<unix_millis>` for
//! manual inspection, and the spool is truncated to its valid prefix. Torn
//! tails are kept as well because a length field damaged in the middle of the
//! file looks exactly like a torn tail (the record seems to run past the end),
//! and deleting everything after it would silently lose events.
//!
//! A drained spool (cursor at the end) is truncated to zero bytes, so the file
//! does not grow forever while traffic keeps spilling into it.
//!
//! One process owns a spool directory: two appending to the same file would
//! interleave records unsafely, and each would replay the other's events.
//! [`SpoolDirLock`] makes that a refusal at start-up rather than a hazard.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Name of the spool file inside the spool directory.
pub const SPOOL_FILE_NAME: &str = "usage.spool";

/// The lock file that makes a spool directory one process's; it holds the
/// owner's pid, for the message a second process gets.
pub const LOCK_FILE_NAME: &str = "tollgate.lock";

/// Largest payload [`Spool::append`] accepts. A usage event is a few hundred
/// bytes of JSON; the cap exists so a damaged length field is recognised as
/// corruption instead of making the scan allocate gigabytes.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Frame header: payload length and checksum, both u32 little-endian.
const HEADER_LEN: usize = 8;

/// Bytes fetched per positional read while scanning or reading a batch: large
/// enough that a batch of small events costs a few syscalls rather than two per
/// record, small enough not to matter as a transient allocation.
const READ_CHUNK: usize = 256 * 1024;

/// Operation names carried by [`SpoolError::Io`].
const OP_OPEN: &str = "open";
const OP_SCAN: &str = "scan";
const OP_QUARANTINE: &str = "quarantine";
const OP_APPEND: &str = "append";
const OP_READ: &str = "read";
const OP_SYNC: &str = "sync";
const OP_LOCK: &str = "lock";

/// Everything that can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file-system call failed; `op` says which spool operation was running.
    #[error("usage spool {op} failed on {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A payload exceeds [`MAX_PAYLOAD_BYTES`]; nothing of its batch was written.
    #[error("usage event is {len} bytes; the spool accepts at most {max} bytes per event")]
    PayloadTooLarge { len: usize, max: usize },
    /// The record at byte `offset` of the spool file is invalid. `open`
    /// quarantines invalid records, so this means the file changed under us.
    #[error("usage spool record at byte {offset} is corrupt")]
    Corrupt { offset: u64 },
    /// Another live process holds the spool directory.
    #[error(
        "the usage spool directory {} is in use by another process ({holder}); \
         each Tollgate process needs a metering.spool_dir of its own",
        dir.display()
    )]
    InUse { dir: PathBuf, holder: String },
}

/// Ownership of a spool directory for as long as this value lives: an
/// exclusive `flock` on its lock file, which the kernel releases when the
/// process ends however it ends (a SIGKILL leaves no stale lock behind).
#[derive(Debug)]
pub struct SpoolDirLock {
    _file: File,
}

impl SpoolDirLock {
    /// Takes the directory (creating it), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, SpoolError> {
        let path = dir.join(LOCK_FILE_NAME);
        let io_err = |source| SpoolError::Io {
            op: OP_LOCK,
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path)
                    .ok()
                    .map(|pid| pid.trim().to_owned())
                    .filter(|pid| !pid.is_empty())
                    .map_or_else(|| "pid unknown".to_owned(), |pid| format!("pid {pid}"));
                return Err(SpoolError::InUse {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(fs::TryLockError::Error(source)) => return Err(io_err(source)),
        }
        file.set_len(0).map_err(io_err)?;
        file.write_all_at(std::process::id().to_string().as_bytes(), 0)
            .map_err(io_err)?;
        let _ = file.flush();
        Ok(Self { _file: file })
    }
}

/// A durable FIFO of opaque usage-event payloads backed by one file.
///
/// Share it through an `Arc`: any number of threads may [`append`](Self::append)
/// while one writer task [`read_batch`](Self::read_batch)es and
/// [`consume`](Self::consume)s.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    /// Only positional I/O (`read_at`/`write_at`) and `set_len`/`sync_data`
    /// touch the file, all of which take `&File`, so the handle itself needs
    /// no lock and never has a shared file offset to fight over.
    file: File,
    /// A std `Mutex`, not an async one: it is never held across an `.await`.
    /// Its users are synchronous code on the request path (overflow appends)
    /// and the writer task, and every critical section is short: an append's
    /// `pwrite` into the page cache, or bookkeeping. The slow parts, reading a
    /// batch (which may hit the disk for a large spool) and `fdatasync`, run
    /// outside it so they never stall the request path.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// End of the valid records; appends write here. Readers never look past
    /// it, so they never see a half-written batch.
    end: u64,
    /// Start of the first unconsumed record.
    cursor: u64,
    /// Records in `cursor..end`.
    unconsumed: usize,
    /// End offset of each record the last `read_batch` returned that has not
    /// been consumed yet, in order; `consume(n)` moves the cursor to the n-th.
    read_ends: Vec<u64>,
    /// Bumped whenever the file is truncated to zero, so a `read_batch` that
    /// read outside the lock can tell its bytes may have been replaced.
    epoch: u64,
    /// Count of appends so far, and the count known to be on disk. Counters,
    /// not a dirty flag: with a flag, a second `sync` racing a first one could
    /// see it already cleared and return before the first `fdatasync` finished.
    appends: u64,
    synced_appends: u64,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovers from a torn or
    /// corrupt tail as described in the module docs, and returns it with the
    /// read cursor at the first record.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        Self::open_file(dir, SPOOL_FILE_NAME)
    }

    /// [`open`](Self::open) for the file `name` in `dir` (the journal keeps
    /// its segments in this format).
    pub fn open_file(dir: &Path, name: &str) -> Result<Spool, SpoolError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SpoolError::Io {
                op: OP_OPEN,
                path,
                source,
            }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        // fdatasync on the file does not persist its directory entry; without
        // this a power loss could lose a freshly created spool file entirely.
        sync_dir(dir).map_err(io_err(dir))?;

        let file_len = file.metadata().map_err(io_err(&path))?.len();
        let scan = scan(&file, file_len).map_err(|source| SpoolError::Io {
            op: OP_SCAN,
            path: path.clone(),
            source,
        })?;
        if let Some(invalid) = scan.invalid {
            quarantine_tail(dir, &path, &file, scan.valid_end, file_len, invalid)?;
        }

        Ok(Spool {
            path,
            file,
            state: Mutex::new(State {
                end: scan.valid_end,
                unconsumed: scan.records,
                ..State::default()
            }),
        })
    }

    /// Appends `payloads` in order as one contiguous write at the end of the
    /// file. All or nothing: if any payload is too large or the write fails,
    /// none of the batch counts as spooled. Does not fsync; see [`Self::sync`].
    pub fn append<'a>(
        &self,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), SpoolError> {
        // Frame and checksum before taking the lock, so concurrent appenders
        // only serialise on the write itself.
        let mut buf = Vec::new();
        let mut records = 0usize;
        for payload in payloads {
            encode_frame(payload, &mut buf)?;
            records += 1;
        }
        if records == 0 {
            return Ok(());
        }

        let mut state = self.lock();
        if let Err(source) = self.file.write_all_at(&buf, state.end) {
            // A failed write (ENOSPC, EIO) may have left part of the batch on
            // disk past `end`. Cut it off so a reopen does not find it; if that
            // fails too, the next append overwrites it from `end` and `open`
            // would quarantine any remnant.
            if let Err(rollback) = self.file.set_len(state.end) {
                tracing::warn!(
                    path = %self.path.display(),
                    error = %rollback,
                    "usage spool: could not cut off a partly written batch"
                );
            }
            return Err(self.io_err(OP_APPEND, source));
        }
        state.end += buf.len() as u64;
        state.unconsumed += records;
        state.appends += 1;
        Ok(())
    }

    /// Makes every append that returned before this call durable against power
    /// loss (`fdatasync`). Does nothing if nothing was appended since the last
    /// successful sync.
    pub fn sync(&self) -> Result<(), SpoolError> {
        let target = {
            let state = self.lock();
            if state.synced_appends >= state.appends {
                return Ok(());
            }
            state.appends
        };
        // Outside the lock: an fdatasync can take milliseconds, and appends on
        // the request path must not wait for it.
        self.file
            .sync_data()
            .map_err(|source| self.io_err(OP_SYNC, source))?;
        let mut state = self.lock();
        state.synced_appends = state.synced_appends.max(target);
        Ok(())
    }

    /// Returns up to `max` records from the read cursor, oldest first, without
    /// consuming them; call [`Self::consume`] once they are safely stored.
    /// Calling it again before `consume` returns the same records.
    ///
    /// If the record at the cursor is invalid, returns
    /// [`SpoolError::Corrupt`]; if a later one is, returns the valid records
    /// before it, and the error comes on the next call.
    pub fn read_batch(&self, max: usize) -> Result<Vec<Vec<u8>>, SpoolError> {
        loop {
            let (cursor, end, epoch) = {
                let state = self.lock();
                (state.cursor, state.end, state.epoch)
            };
            // The bytes in cursor..end are immutable until the file is
            // truncated (which bumps `epoch`), so they can be read without the
            // lock; appends only write at or after `end`.
            let read = read_records(&self.file, cursor, end, max);

            let mut state = self.lock();
            if state.epoch != epoch || state.cursor != cursor {
                // Another thread consumed or truncated meanwhile; what we read
                // may be stale. Never happens with a single consumer.
                continue;
            }
            let batch = read.map_err(|source| self.io_err(OP_READ, source))?;
            if batch.payloads.is_empty()
                && let Some(offset) = batch.invalid_at
            {
                state.read_ends.clear();
                return Err(SpoolError::Corrupt { offset });
            }
            state.read_ends = batch.ends;
            return Ok(batch.payloads);
        }
    }

    /// Consumes the first `n` records of those the last [`Self::read_batch`]
    /// returned (and that are not consumed yet). When that empties the spool,
    /// truncates the file to zero bytes, under the same lock as `append`, so
    /// no concurrent append can land in the part being cut off.
    ///
    /// Infallible by design: asking for more records than were read is a
    /// caller bug, handled by consuming only those read (the rest are simply
    /// read again, which is harmless); a failed truncation only means the file
    /// keeps its size until the spool drains again.
    pub fn consume(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut state = self.lock();
        let read = state.read_ends.len();
        if n > read {
            tracing::error!(
                requested = n,
                read,
                "usage spool: consume() of more records than read_batch() returned; \
                 consuming only those read"
            );
        }
        let n = n.min(read);
        let Some(&new_cursor) = n.checked_sub(1).and_then(|last| state.read_ends.get(last)) else {
            return;
        };
        state.read_ends.drain(..n);
        state.cursor = new_cursor;
        state.unconsumed = state.unconsumed.saturating_sub(n);

        if state.cursor == state.end {
            // No fsync: if a power loss undoes the truncation, the drained
            // records are replayed, which is harmless.
            match self.file.set_len(0) {
                Ok(()) => {
                    state.cursor = 0;
                    state.end = 0;
                    state.epoch += 1;
                    state.read_ends.clear();
                }
                Err(error) => tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    "usage spool: could not truncate the drained spool file"
                ),
            }
        }
    }

    /// Records appended and not consumed yet.
    pub fn len(&self) -> usize {
        self.lock().unconsumed
    }

    /// Whether every appended record has been consumed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The spool file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of records (framing included) appended and not consumed yet.
    pub fn bytes(&self) -> u64 {
        let state = self.lock();
        state.end - state.cursor
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock is safe to keep using: every critical section does
        // its I/O first and only then updates fields with plain assignments, so
        // a panic cannot leave the state half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn io_err(&self, op: &'static str, source: io::Error) -> SpoolError {
        SpoolError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

/// Appends the frame for `payload` to `buf`.
fn encode_frame(payload: &[u8], buf: &mut Vec<u8>) -> Result<(), SpoolError> {
    let too_large = SpoolError::PayloadTooLarge {
        len: payload.len(),
        max: MAX_PAYLOAD_BYTES,
    };
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(too_large);
    }
    let len = u32::try_from(payload.len()).map_err(|_| too_large)?;
    let len_bytes = len.to_le_bytes();
    buf.reserve(HEADER_LEN + payload.len());
    buf.extend_from_slice(&len_bytes);
    buf.extend_from_slice(&frame_crc(len_bytes, payload).to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

fn frame_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(payload);
    hasher.finalize()
}

/// Why a record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invalid {
    /// The record runs past the end of the range: a write cut short.
    Torn,
    /// The length field exceeds [`MAX_PAYLOAD_BYTES`].
    BadLength(u32),
    /// The checksum does not match.
    BadCrc,
}

impl Invalid {
    /// File-name tag of the quarantine file.
    fn tag(self) -> &'static str {
        match self {
            Invalid::Torn => "torn",
            Invalid::BadLength(_) | Invalid::BadCrc => "corrupt",
        }
    }
}

enum Frame<'a> {
    Record(&'a [u8]),
    End,
    Invalid(Invalid),
}

/// Reads frames sequentially from `pos` up to `limit` with positional reads,
/// fetching [`READ_CHUNK`]-sized windows rather than two syscalls per record.
struct FrameReader<'f> {
    file: &'f File,
    window: Vec<u8>,
    window_start: u64,
    /// Offset of the next frame; always `<= limit`.
    pos: u64,
    limit: u64,
}

impl<'f> FrameReader<'f> {
    fn new(file: &'f File, pos: u64, limit: u64) -> Self {
        FrameReader {
            file,
            window: Vec::new(),
            window_start: pos,
            pos: pos.min(limit),
            limit,
        }
    }

    /// Makes the window hold `pos..pos + need`; `false` if `limit` comes first.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        let need = need as u64;
        if self.limit - self.pos < need {
            return Ok(false);
        }
        let window_end = self.window_start + self.window.len() as u64;
        if self.window_start <= self.pos && self.pos + need <= window_end {
            return Ok(true);
        }
        let len = need.max(READ_CHUNK as u64).min(self.limit - self.pos);
        // `len` is at most HEADER_LEN + MAX_PAYLOAD_BYTES or READ_CHUNK.
        self.window.resize(len as usize, 0);
        self.file.read_exact_at(&mut self.window, self.pos)?;
        self.window_start = self.pos;
        Ok(true)
    }

    fn next_frame(&mut self) -> io::Result<Frame<'_>> {
        if self.pos == self.limit {
            return Ok(Frame::End);
        }
        if !self.fill(HEADER_LEN)? {
            return Ok(Frame::Invalid(Invalid::Torn));
        }
        let at = (self.pos - self.window_start) as usize;
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.window[at..at + HEADER_LEN]);
        let len_bytes = [header[0], header[1], header[2], header[3]];
        let len = u32::from_le_bytes(len_bytes);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len as usize > MAX_PAYLOAD_BYTES {
            return Ok(Frame::Invalid(Invalid::BadLength(len)));
        }
        let frame_len = HEADER_LEN + len as usize;
        if !self.fill(frame_len)? {
            return Ok(Frame::Invalid(Invalid::Torn));
        }
        let start = (self.pos - self.window_start) as usize + HEADER_LEN;
        let payload_end = start + len as usize;
        if frame_crc(len_bytes, &self.window[start..payload_end]) != crc {
            return Ok(Frame::Invalid(Invalid::BadCrc));
        }
        self.pos += frame_len as u64;
        Ok(Frame::Record(&self.window[start..payload_end]))
    }
}

/// What `open` found in an existing spool file.
struct Scan {
    records: usize,
    /// End of the last valid record.
    valid_end: u64,
    invalid: Option<Invalid>,
}

fn scan(file: &File, file_len: u64) -> io::Result<Scan> {
    let mut reader = FrameReader::new(file, 0, file_len);
    let mut records = 0;
    let invalid = loop {
        match reader.next_frame()? {
            Frame::Record(_) => records += 1,
            Frame::End => break None,
            Frame::Invalid(invalid) => break Some(invalid),
        }
    };
    Ok(Scan {
        records,
        valid_end: reader.pos,
        invalid,
    })
}

/// Records read by `read_batch`.
struct Batch {
    payloads: Vec<Vec<u8>>,
    /// End offset of each record in `payloads`.
    ends: Vec<u64>,
    /// Offset of an invalid record that stopped the read, if one did.
    invalid_at: Option<u64>,
}

fn read_records(file: &File, cursor: u64, end: u64, max: usize) -> io::Result<Batch> {
    let mut reader = FrameReader::new(file, cursor, end);
    let mut batch = Batch {
        payloads: Vec::new(),
        ends: Vec::new(),
        invalid_at: None,
    };
    while batch.payloads.len() < max {
        let offset = reader.pos;
        match reader.next_frame()? {
            Frame::Record(payload) => {
                batch.payloads.push(payload.to_vec());
                batch.ends.push(reader.pos);
            }
            Frame::End => break,
            // Below `end` every record was complete when it was appended, so
            // even a "torn" one here means the file changed under us.
            Frame::Invalid(_) => {
                batch.invalid_at = Some(offset);
                break;
            }
        }
    }
    Ok(batch)
}

/// Copies `valid_end..file_len` of the spool into a quarantine file next to
/// it, makes that durable, then truncates the spool to `valid_end`.
fn quarantine_tail(
    dir: &Path,
    spool_path: &Path,
    spool: &File,
    valid_end: u64,
    file_len: u64,
    invalid: Invalid,
) -> Result<(), SpoolError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SpoolError::Io {
            op: OP_QUARANTINE,
            path,
            source,
        }
    };
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let name = spool_path
        .file_name()
        .map_or_else(|| SPOOL_FILE_NAME.into(), |n| n.to_string_lossy());
    let (quarantine_path, mut out) =
        create_unique(dir, &format!("{name}.{}-{millis}", invalid.tag())).map_err(io_err(dir))?;

    let mut chunk = vec![0u8; READ_CHUNK];
    let mut pos = valid_end;
    while pos < file_len {
        let n = (file_len - pos).min(READ_CHUNK as u64) as usize;
        let buf = &mut chunk[..n];
        spool.read_exact_at(buf, pos).map_err(io_err(spool_path))?;
        out.write_all(buf).map_err(io_err(&quarantine_path))?;
        pos += n as u64;
    }
    // The quarantine copy must be on disk before the spool loses those bytes.
    out.sync_all().map_err(io_err(&quarantine_path))?;
    sync_dir(dir).map_err(io_err(dir))?;
    spool.set_len(valid_end).map_err(io_err(spool_path))?;
    spool.sync_all().map_err(io_err(spool_path))?;

    let bytes = file_len - valid_end;
    match invalid {
        Invalid::Torn => tracing::warn!(
            spool = %spool_path.display(),
            offset = valid_end,
            bytes,
            quarantine = %quarantine_path.display(),
            "usage spool: torn record at the end (a crash during a write); \
             moved it aside and kept the records before it"
        ),
        Invalid::BadLength(_) | Invalid::BadCrc => tracing::error!(
            spool = %spool_path.display(),
            offset = valid_end,
            bytes,
            reason = ?invalid,
            quarantine = %quarantine_path.display(),
            "usage spool: CORRUPT record; the records from it to the end are NOT \
             replayed and were moved to the quarantine file; inspect it and \
             recover the usage events by hand"
        ),
    }
    Ok(())
}

/// Creates `dir/name`, or `dir/name.1`, `dir/name.2`, … if taken, so a second
/// recovery in the same millisecond never overwrites an earlier quarantine.
fn create_unique(dir: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    let mut suffix = 0u32;
    loop {
        let path = if suffix == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{name}.{suffix}"))
        };
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && suffix < 1000 => suffix += 1,
            Err(e) => return Err(e),
        }
    }
}

/// fsyncs a directory, persisting the entries created in it.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_frame(payload, &mut buf).unwrap();
        buf
    }

    fn spool_len_on_disk(dir: &Path) -> u64 {
        fs::metadata(dir.join(SPOOL_FILE_NAME)).unwrap().len()
    }

    fn append_raw(dir: &Path, bytes: &[u8]) {
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.join(SPOOL_FILE_NAME))
            .unwrap();
        file.write_all(bytes).unwrap();
    }

    /// Quarantine files in `dir` whose name starts with `usage.spool.<tag>-`.
    fn quarantined(dir: &Path, tag: &str) -> Vec<Vec<u8>> {
        let prefix = format!("{SPOOL_FILE_NAME}.{tag}-");
        fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with(&prefix))
            })
            .map(|path| fs::read(path).unwrap())
            .collect()
    }

    fn strings(batch: Vec<Vec<u8>>) -> Vec<String> {
        batch
            .into_iter()
            .map(|payload| String::from_utf8(payload).unwrap())
            .collect()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let payloads: [&[u8]; 3] = [b"{\"id\":1}", b"", b"{\"id\":3}"];
        spool.append(payloads).unwrap();
        spool.sync().unwrap();

        assert_eq!(spool.len(), 3);
        let expected_bytes: usize = payloads.iter().map(|p| HEADER_LEN + p.len()).sum();
        assert_eq!(spool.bytes(), expected_bytes as u64);
        let batch = spool.read_batch(10).unwrap();
        assert_eq!(batch, payloads.map(<[u8]>::to_vec));

        spool.consume(3);
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert!(spool.read_batch(10).unwrap().is_empty());
    }

    #[test]
    fn order_is_kept_across_appends_and_partial_consumes() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.append([b"a".as_slice(), b"b"]).unwrap();
        spool.append([b"c".as_slice()]).unwrap();
        spool.append([b"d".as_slice(), b"e", b"f"]).unwrap();

        assert_eq!(strings(spool.read_batch(4).unwrap()), ["a", "b", "c", "d"]);
        // Consume part of what was read, then the rest of it.
        spool.consume(1);
        spool.consume(2);
        assert_eq!(spool.len(), 3);
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["d", "e", "f"]);
        spool.consume(3);
        assert!(spool.is_empty());
    }

    #[test]
    fn read_batch_does_not_consume() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.append([b"x".as_slice(), b"y"]).unwrap();
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["x", "y"]);
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["x", "y"]);
        assert!(spool.read_batch(0).unwrap().is_empty());
        assert_eq!(spool.len(), 2);
    }

    #[test]
    fn consume_more_than_was_read_consumes_only_what_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.append([b"x".as_slice(), b"y", b"z"]).unwrap();
        spool.read_batch(2).unwrap();
        // A caller bug must never skip the unread "z".
        spool.consume(3);
        assert_eq!(spool.len(), 1);
        // Nor may consuming the same records twice.
        spool.consume(1);
        assert_eq!(spool.len(), 1);
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["z"]);
    }

    #[test]
    fn reopen_replays_unconsumed_and_consumed_but_untruncated_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path()).unwrap();
            spool.append([b"1".as_slice(), b"2", b"3"]).unwrap();
            spool.read_batch(2).unwrap();
            spool.consume(2);
            assert_eq!(spool.len(), 1);
        }
        // The cursor is not persisted: "1" and "2" were consumed but the file
        // was not drained, so they come back. By design; inserts are
        // idempotent on the event id.
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.len(), 3);
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["1", "2", "3"]);
    }

    #[test]
    fn consume_to_the_end_truncates_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.append([b"first".as_slice(), b"second"]).unwrap();
        assert!(spool_len_on_disk(dir.path()) > 0);

        spool.read_batch(10).unwrap();
        spool.consume(1);
        assert!(spool_len_on_disk(dir.path()) > 0, "not drained yet");
        spool.consume(1);
        assert_eq!(spool_len_on_disk(dir.path()), 0);
        assert_eq!(spool.bytes(), 0);

        // The spool keeps working from offset zero.
        spool.append([b"third".as_slice()]).unwrap();
        assert_eq!(spool_len_on_disk(dir.path()), frame(b"third").len() as u64);
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["third"]);
        drop(spool);
        // And nothing drained comes back after a reopen.
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["third"]);
    }

    #[test]
    fn torn_tail_is_cut_off_and_earlier_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path()).unwrap();
            spool.append([b"kept-1".as_slice(), b"kept-2"]).unwrap();
        }
        let valid_len = spool_len_on_disk(dir.path());
        // A crash in the middle of writing a third record.
        let torn = frame(b"never-finished");
        append_raw(dir.path(), &torn[..torn.len() - 5]);

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.len(), 2);
        assert_eq!(spool_len_on_disk(dir.path()), valid_len);
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["kept-1", "kept-2"]);
        assert_eq!(quarantined(dir.path(), "torn"), [&torn[..torn.len() - 5]]);
        assert!(quarantined(dir.path(), "corrupt").is_empty());

        // New appends go right after the valid records.
        spool.append([b"kept-3".as_slice()]).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(
            strings(spool.read_batch(10).unwrap()),
            ["kept-1", "kept-2", "kept-3"]
        );
    }

    #[test]
    fn torn_header_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        drop(Spool::open(dir.path()).unwrap());
        append_raw(dir.path(), &frame(b"x")[..3]);
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool_len_on_disk(dir.path()), 0);
    }

    #[test]
    fn corrupt_crc_in_the_middle_keeps_the_valid_prefix_and_quarantines_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path()).unwrap();
            spool
                .append([b"good".as_slice(), b"flipped", b"after"])
                .unwrap();
        }
        let good_len = frame(b"good").len();
        let mut bytes = fs::read(dir.path().join(SPOOL_FILE_NAME)).unwrap();
        bytes[good_len + HEADER_LEN + 2] ^= 0x01;
        fs::write(dir.path().join(SPOOL_FILE_NAME), &bytes).unwrap();

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.len(), 1);
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["good"]);
        assert_eq!(spool_len_on_disk(dir.path()), good_len as u64);
        // The bad record and everything after it, byte for byte.
        assert_eq!(quarantined(dir.path(), "corrupt"), [&bytes[good_len..]]);
    }

    #[test]
    fn absurd_length_in_the_middle_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path()).unwrap();
            spool.append([b"good".as_slice()]).unwrap();
        }
        let mut garbage = (u32::MAX).to_le_bytes().to_vec();
        garbage.extend_from_slice(&[0xAB; 12]);
        append_raw(dir.path(), &garbage);
        append_raw(dir.path(), &frame(b"behind-the-damage"));

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["good"]);
        let quarantine = quarantined(dir.path(), "corrupt");
        assert_eq!(quarantine.len(), 1);
        assert!(quarantine[0].ends_with(b"behind-the-damage"));
    }

    #[test]
    fn zero_filled_tail_is_not_read_as_empty_records() {
        // After a power loss the file size can reach disk before its data,
        // leaving zeros. With a payload-only crc, 8 zero bytes would be a
        // valid empty record; the crc also covers the length to reject them.
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path()).unwrap();
            spool.append([b"real".as_slice()]).unwrap();
        }
        append_raw(dir.path(), &[0u8; 64]);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["real"]);
        assert_eq!(quarantined(dir.path(), "corrupt"), [vec![0u8; 64]]);
    }

    #[test]
    fn record_damaged_after_open_is_reported_at_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.append([b"ok".as_slice(), b"damaged"]).unwrap();
        // Damage the second record behind the spool's back.
        let offset = frame(b"ok").len() as u64;
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(SPOOL_FILE_NAME))
            .unwrap();
        file.write_all_at(b"X", offset + HEADER_LEN as u64).unwrap();

        // The valid record before it is still delivered first.
        assert_eq!(strings(spool.read_batch(10).unwrap()), ["ok"]);
        spool.consume(1);
        let err = spool.read_batch(10).unwrap_err();
        assert!(matches!(err, SpoolError::Corrupt { offset: o } if o == offset));
    }

    #[test]
    fn payload_too_large_rejects_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let huge = vec![b'x'; MAX_PAYLOAD_BYTES + 1];
        let err = spool.append([b"small".as_slice(), &huge]).unwrap_err();
        assert!(matches!(
            err,
            SpoolError::PayloadTooLarge { len, max } if len == MAX_PAYLOAD_BYTES + 1 && max == MAX_PAYLOAD_BYTES
        ));
        assert!(spool.is_empty());
        assert_eq!(spool_len_on_disk(dir.path()), 0);

        // Exactly the limit is fine, and survives a reopen's scan.
        let largest = vec![b'y'; MAX_PAYLOAD_BYTES];
        spool.append([largest.as_slice()]).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.read_batch(1).unwrap(), [largest]);
    }

    #[test]
    fn empty_spool() {
        let dir = tempfile::tempdir().unwrap();
        // `open` creates a missing directory.
        let spool_dir = dir.path().join("nested").join("spool");
        let spool = Spool::open(&spool_dir).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.len(), 0);
        assert_eq!(spool.bytes(), 0);
        assert!(spool.read_batch(100).unwrap().is_empty());
        spool.consume(0);
        spool.consume(1);
        assert!(spool.is_empty());
        spool.append(std::iter::empty()).unwrap();
        spool.sync().unwrap();
        assert_eq!(spool_len_on_disk(&spool_dir), 0);
    }

    #[test]
    fn concurrent_appends_and_draining_lose_and_duplicate_nothing() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 1000;
        // Small batches interleave appends from different threads.
        const APPEND_BATCH: usize = 10;

        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let finished = AtomicUsize::new(0);

        let seen = std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (spool, finished) = (&spool, &finished);
                scope.spawn(move || {
                    for chunk in (0..PER_THREAD).collect::<Vec<_>>().chunks(APPEND_BATCH) {
                        let payloads: Vec<String> =
                            chunk.iter().map(|i| format!("{thread}:{i}")).collect();
                        spool.append(payloads.iter().map(String::as_bytes)).unwrap();
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                });
            }

            let drainer = scope.spawn(|| {
                let mut seen = Vec::new();
                loop {
                    // Read `finished` first: if every appender was done before
                    // an empty read, nothing more can arrive.
                    let all_done = finished.load(Ordering::SeqCst) == THREADS;
                    let batch = spool.read_batch(97).unwrap();
                    if batch.is_empty() {
                        if all_done {
                            return seen;
                        }
                        std::thread::yield_now();
                        continue;
                    }
                    // Consume in two steps to exercise partial consumption.
                    let n = batch.len();
                    spool.consume(n / 2);
                    spool.consume(n - n / 2);
                    seen.extend(strings(batch));
                }
            });
            drainer.join().unwrap()
        });

        assert_eq!(seen.len(), THREADS * PER_THREAD, "lost or duplicated");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), THREADS * PER_THREAD, "duplicated");
        // Each thread's events come out in the order it appended them.
        let mut next = [0usize; THREADS];
        for payload in &seen {
            let (thread, i) = payload.split_once(':').unwrap();
            let (thread, i): (usize, usize) = (thread.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[thread], "thread {thread} out of order");
            next[thread] += 1;
        }
        assert!(spool.is_empty());
        assert_eq!(spool_len_on_disk(dir.path()), 0, "drained file truncated");
    }
}
