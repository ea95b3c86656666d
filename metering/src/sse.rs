//! Server-sent events, as the event-stream format defines them: where an
//! event ends, and its `data`. The one splitter for every stream Tollgate
//! reads: answers it meters ([`crate::capture`]) and Triton streams it
//! transcodes ([`EventReader`]).

/// Finds where SSE events end: at a blank line, with lines ending in LF, CRLF
/// or a lone CR as the event-stream format allows. Its state carries across
/// chunks, so every byte is looked at once.
#[derive(Debug, Default)]
pub struct EventSplitter {
    /// The current line has bytes, so the next line end is not a blank line.
    in_line: bool,
    /// The last byte seen was a CR ending a line; an LF next completes a CRLF.
    pub(crate) after_cr: bool,
}

impl EventSplitter {
    /// Length of the prefix of `bytes` that completes the current event,
    /// including the blank line's line end, or `None` when `bytes` does not
    /// complete it. After a CR that ends `bytes`, `after_cr` is left set.
    pub fn next_event_len(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut at = 0;
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes.first() == Some(&b'\n') {
                at = 1;
            }
        }
        loop {
            let rest = bytes.get(at..)?;
            let Some(offset) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.in_line |= !rest.is_empty();
                return None;
            };
            let blank = !self.in_line && offset == 0;
            self.in_line = false;
            let line_end = at + offset;
            at = line_end + 1;
            if bytes.get(line_end) == Some(&b'\r') {
                match bytes.get(at) {
                    Some(b'\n') => at += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if blank {
                return Some(at);
            }
        }
    }
}

/// The `data` of an SSE event: its `data` field values joined with LF, as the
/// event-stream format says, borrowed from `event` when there is one line.
/// `None` when the event has no `data` field (a comment, a keep-alive).
pub fn event_data<'a>(event: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    let mut first: Option<&'a [u8]> = None;
    let mut joined = false;
    let lines = event.split(|&b| b == b'\n' || b == b'\r');
    for line in lines.filter(|l| !l.is_empty() && l.first() != Some(&b':')) {
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = line.get(colon + 1..).unwrap_or_default();
                let value = value.strip_prefix(b" ").unwrap_or(value);
                (line.get(..colon).unwrap_or_default(), value)
            }
            None => (line, &b""[..]),
        };
        if field != b"data" {
            continue;
        }
        match first {
            None => first = Some(value),
            Some(first_value) => {
                if !joined {
                    scratch.clear();
                    scratch.extend_from_slice(first_value);
                    joined = true;
                }
                scratch.push(b'\n');
                scratch.extend_from_slice(value);
            }
        }
    }
    if joined { Some(scratch) } else { first }
}

/// An event outgrew the reader's limit.
#[derive(Debug, PartialEq, Eq)]
pub struct EventTooLarge;

/// The data of each event of a stream that arrives in chunks. Only the
/// start of an event a chunk ends inside is held, at most `limit` bytes.
#[derive(Debug)]
pub struct EventReader {
    splitter: EventSplitter,
    /// The start of the current event, when a chunk ended inside it.
    held: Vec<u8>,
    /// The last event completed from held bytes (its allocation is reused).
    event: Vec<u8>,
    /// Where multi-line data is joined.
    scratch: Vec<u8>,
    limit: usize,
}

impl EventReader {
    pub fn new(limit: usize) -> Self {
        Self {
            splitter: EventSplitter::default(),
            held: Vec::new(),
            event: Vec::new(),
            scratch: Vec::new(),
            limit,
        }
    }

    /// The data of the next event completed in `chunk[*at..]`, moving `*at`
    /// past it; `None` when the rest of the chunk completes no event with
    /// data (an unfinished event is then held). Events without a `data`
    /// field (comments, keep-alives) are skipped.
    pub fn next_data<'a>(
        &'a mut self,
        chunk: &'a [u8],
        at: &mut usize,
    ) -> Result<Option<&'a [u8]>, EventTooLarge> {
        loop {
            let rest = chunk.get(*at..).unwrap_or_default();
            let Some(len) = self.splitter.next_event_len(rest) else {
                self.hold(rest)?;
                *at = chunk.len();
                return Ok(None);
            };
            *at += len;
            let part = rest.get(..len).unwrap_or_default();
            // Each branch looks first and borrows to return after: a borrow
            // returned from one pass of a loop would hold `self` for all.
            if self.held.is_empty() {
                if event_data(part, &mut self.scratch).is_some() {
                    return Ok(event_data(part, &mut self.scratch));
                }
            } else {
                self.hold(part)?;
                std::mem::swap(&mut self.held, &mut self.event);
                self.held.clear();
                if event_data(&self.event, &mut self.scratch).is_some() {
                    return Ok(event_data(&self.event, &mut self.scratch));
                }
            }
        }
    }

    /// At the end of the stream: the data of an event the stream ended
    /// inside (no blank line after it), if it has any.
    pub fn end(&mut self) -> Option<&[u8]> {
        std::mem::swap(&mut self.held, &mut self.event);
        self.held.clear();
        event_data(&self.event, &mut self.scratch)
    }

    /// Bytes of memory held for unfinished and finished events.
    pub fn capacity(&self) -> usize {
        self.held.capacity() + self.event.capacity()
    }

    /// Keeps `part` of the current event, or fails past the limit (and
    /// gives the memory back: the stream is over).
    fn hold(&mut self, part: &[u8]) -> Result<(), EventTooLarge> {
        if self.held.len().saturating_add(part.len()) > self.limit {
            self.held = Vec::new();
            self.event = Vec::new();
            return Err(EventTooLarge);
        }
        self.held.extend_from_slice(part);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(reader: &mut EventReader, chunks: &[&[u8]]) -> Vec<String> {
        let mut data = Vec::new();
        for chunk in chunks {
            let mut at = 0;
            while let Some(d) = reader.next_data(chunk, &mut at).unwrap() {
                data.push(String::from_utf8(d.to_vec()).unwrap());
            }
        }
        data.extend(reader.end().map(|d| String::from_utf8(d.to_vec()).unwrap()));
        data
    }

    #[test]
    fn events_read_the_same_however_the_stream_is_cut() {
        let stream: &[u8] =
            b": hello\r\n\r\ndata: one\r\n\r\nevent: x\rdata: two\rdata: lines\r\rdata: last";
        let whole = read_all(&mut EventReader::new(1024), &[stream]);
        assert_eq!(whole, ["one", "two\nlines", "last"]);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(
                read_all(&mut EventReader::new(1024), &[a, b]),
                whole,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_event_past_the_limit_fails_and_frees_what_was_held() {
        let mut reader = EventReader::new(16);
        let mut at = 0;
        assert_eq!(reader.next_data(b"data: 0123456789", &mut at), Ok(None));
        at = 0;
        assert_eq!(reader.next_data(b"abcdef", &mut at), Err(EventTooLarge));
        assert_eq!(reader.capacity(), 0);
    }
}
