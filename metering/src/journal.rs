//! The write-ahead journal: every usage event is on disk before the answer it
//! bills is released to the client, so a crash cannot unbill what was answered.
//!
//! [`UsageSink::record`](crate::writer::UsageSink::record) appends each event
//! here (one `pwrite` into the page cache, which survives a process crash:
//! SIGKILL, an OOM kill, a panic) before it goes through the writer's
//! channel. Once the writer has the event in Postgres or in the spool it
//! *settles* it here. For power loss or a kernel crash the writer
//! `fdatasync`s the journal every `journal_sync_interval`: that interval is
//! the most an event can be exposed for.
//!
//! The journal is a directory of segments, `journal-<n>.log`, each in the
//! spool's framed, checksummed format ([`Spool`]). Appends go to the newest
//! segment. The writer seals it and starts a new one once it has grown past
//! [`ROTATE_BYTES`] (never on the request path: creating a file syncs the
//! directory), and deletes a sealed segment once every event in it is
//! settled. What a crash leaves behind is replayed at the next start:
//! [`Journal::open`] moves every record of the old segments into the spool,
//! which the writer then writes to Postgres, where the event id makes a
//! record already written a no-op.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::spool::{Spool, SpoolError};

/// Sealing a segment at this size keeps what a crash leaves to replay small
/// (at most a few hundred events already in Postgres) without creating files
/// often: at 10,000 events a second one every few hundred milliseconds.
pub const ROTATE_BYTES: u64 = 256 * 1024;

/// The journal's directory inside the spool directory.
pub const JOURNAL_DIR: &str = "journal";

const SEGMENT_PREFIX: &str = "journal-";
const SEGMENT_SUFFIX: &str = ".log";

/// Which segment an event was appended to, so settling finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalMark {
    segment: u64,
}

/// The journal of one process; share it through an `Arc`.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    active: Segment,
    /// Sealed segments with events not settled yet, by id.
    sealed: BTreeMap<u64, Segment>,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    file: Arc<Spool>,
    /// Events appended and not settled yet.
    unsettled: u64,
}

impl Journal {
    /// Opens the journal in `dir`: the records of any segments a previous
    /// run left are appended to `spool` (and synced) and those segments
    /// deleted; a new segment starts. Returns the journal and how many
    /// records it moved.
    pub fn open(dir: &Path, spool: &Spool) -> Result<(Self, usize), SpoolError> {
        fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        let mut moved = 0;
        let mut next_id = 0;
        for (id, name) in segments(dir)? {
            next_id = next_id.max(id + 1);
            let segment = Spool::open_file(dir, &name)?;
            loop {
                let records = segment.read_batch(1024)?;
                if records.is_empty() {
                    break;
                }
                spool.append(records.iter().map(Vec::as_slice))?;
                moved += records.len();
                segment.consume(records.len());
            }
            // Durable in the spool before the journal lets go of them.
            spool.sync()?;
            let path = segment.path().to_path_buf();
            drop(segment);
            fs::remove_file(&path).map_err(|source| io_error(&path, source))?;
        }
        let active = Segment::create(dir, next_id)?;
        let journal = Self {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                active,
                sealed: BTreeMap::new(),
            }),
        };
        Ok((journal, moved))
    }

    /// Appends one record to the newest segment (no fsync: see the module docs).
    pub fn append(&self, payload: &[u8]) -> Result<JournalMark, SpoolError> {
        let mut state = self.lock();
        state.active.file.append([payload])?;
        state.active.unsettled += 1;
        Ok(JournalMark {
            segment: state.active.id,
        })
    }

    /// The events behind `marks` are in Postgres or in the spool: a sealed
    /// segment whose events are all settled is deleted.
    pub fn settle(&self, marks: impl IntoIterator<Item = JournalMark>) {
        let mut done = Vec::new();
        {
            let mut state = self.lock();
            for mark in marks {
                let segment = if mark.segment == state.active.id {
                    Some(&mut state.active)
                } else {
                    state.sealed.get_mut(&mark.segment)
                };
                if let Some(segment) = segment {
                    segment.unsettled = segment.unsettled.saturating_sub(1);
                }
            }
            state.sealed.retain(|_, segment| {
                let settled = segment.unsettled == 0;
                if settled {
                    done.push(Arc::clone(&segment.file));
                }
                !settled
            });
        }
        for file in done {
            remove(&file);
        }
    }

    /// Makes every append so far durable against power loss, and seals the
    /// newest segment once it is past [`ROTATE_BYTES`]. Called by the writer
    /// off the request path: it syncs and may create a file.
    pub fn sync_and_rotate(&self) -> Result<(), SpoolError> {
        let files: Vec<Arc<Spool>> = {
            let state = self.lock();
            std::iter::once(&state.active)
                .chain(state.sealed.values())
                .map(|s| Arc::clone(&s.file))
                .collect()
        };
        for file in &files {
            file.sync()?;
        }
        let (size, id) = {
            let state = self.lock();
            (state.active.file.bytes(), state.active.id)
        };
        if size < ROTATE_BYTES {
            return Ok(());
        }
        let fresh = Segment::create(&self.dir, id + 1)?;
        let sealed = {
            let mut state = self.lock();
            let sealed = std::mem::replace(&mut state.active, fresh);
            let file = Arc::clone(&sealed.file);
            state.sealed.insert(sealed.id, sealed);
            file
        };
        // Appends that raced the swap landed in the sealed one: sync it again.
        sealed.sync()?;
        // It may be settled already.
        self.settle([]);
        Ok(())
    }

    /// Events appended and not settled yet.
    pub fn unsettled(&self) -> u64 {
        let state = self.lock();
        state.active.unsettled + state.sealed.values().map(|s| s.unsettled).sum::<u64>()
    }

    /// At a clean exit with every event settled: nothing is left to replay.
    pub fn close(&self) {
        let state = self.lock();
        if state.active.unsettled == 0 && state.sealed.is_empty() {
            remove(&state.active.file);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section does its I/O before it changes a field, so
        // a panic cannot leave the counts half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Segment {
    fn create(dir: &Path, id: u64) -> Result<Self, SpoolError> {
        let name = format!("{SEGMENT_PREFIX}{id:020}{SEGMENT_SUFFIX}");
        Ok(Self {
            id,
            file: Arc::new(Spool::open_file(dir, &name)?),
            unsettled: 0,
        })
    }
}

/// The segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, String)>, SpoolError> {
    let entries = fs::read_dir(dir).map_err(|source| io_error(dir, source))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| io_error(dir, source))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let id = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|rest| rest.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|id| id.parse::<u64>().ok());
        if let Some(id) = id {
            found.push((id, name));
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes a segment whose every event is settled. A failure only means the
/// next start replays events that are already stored, which is harmless.
fn remove(file: &Spool) {
    if let Err(error) = fs::remove_file(file.path()) {
        tracing::warn!(path = %file.path().display(), %error, "could not delete a settled journal segment");
    }
}

fn io_error(path: &Path, source: std::io::Error) -> SpoolError {
    SpoolError::Io {
        op: "journal",
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (Spool, Journal, usize) {
        let spool = Spool::open(&dir.join("spool")).unwrap();
        let (journal, moved) = Journal::open(&dir.join("journal"), &spool).unwrap();
        (spool, journal, moved)
    }

    fn segment_count(dir: &Path) -> usize {
        segments(&dir.join("journal")).unwrap().len()
    }

    #[test]
    fn unsettled_events_are_replayed_into_the_spool_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (_, journal, moved) = open(dir.path());
        assert_eq!(moved, 0);
        let a = journal.append(b"a").unwrap();
        journal.append(b"b").unwrap();
        journal.settle([a]);
        // A crash: the journal is dropped without close.
        drop(journal);
        let (spool, _journal, moved) = open(dir.path());
        // The active segment is replayed whole: "a" is written twice, which
        // the event id makes harmless.
        assert_eq!(moved, 2);
        assert_eq!(
            spool.read_batch(10).unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(segment_count(dir.path()), 1, "only the new segment is left");
    }

    #[test]
    fn sealed_segments_are_deleted_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let (_, journal, _) = open(dir.path());
        let payload = vec![b'x'; 1024];
        let mut marks = Vec::new();
        while marks.len() as u64 * 1032 < ROTATE_BYTES {
            marks.push(journal.append(&payload).unwrap());
        }
        journal.sync_and_rotate().unwrap();
        assert_eq!(segment_count(dir.path()), 2, "sealed and new");
        let late = journal.append(b"late").unwrap();
        journal.settle(marks);
        assert_eq!(segment_count(dir.path()), 1, "the sealed one is gone");
        assert_eq!(journal.unsettled(), 1);
        journal.settle([late]);
        journal.close();
        assert_eq!(segment_count(dir.path()), 0);
        let (_, _, moved) = open(dir.path());
        assert_eq!(moved, 0, "a clean exit leaves nothing to replay");
    }

    #[test]
    fn a_fully_settled_segment_is_deleted_when_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let (_, journal, _) = open(dir.path());
        let payload = vec![b'y'; 64 * 1024];
        let marks: Vec<_> = (0..5).map(|_| journal.append(&payload).unwrap()).collect();
        journal.settle(marks);
        journal.sync_and_rotate().unwrap();
        assert_eq!(segment_count(dir.path()), 1);
    }
}
