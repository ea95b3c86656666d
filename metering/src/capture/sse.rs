//! Server-sent events, as the event-stream format defines them: where an
//! event ends, and its `data`.

/// Finds where SSE events end: at a blank line, with lines ending in LF, CRLF
/// or a lone CR as the event-stream format allows. Its state carries across
/// chunks, so every byte is looked at once.
#[derive(Debug, Default)]
pub(super) struct EventSplitter {
    /// The current line has bytes, so the next line end is not a blank line.
    in_line: bool,
    /// The last byte seen was a CR ending a line; an LF next completes a CRLF.
    pub(super) after_cr: bool,
}

impl EventSplitter {
    /// Length of the prefix of `bytes` that completes the current event,
    /// including the blank line's line end, or `None` when `bytes` does not
    /// complete it. After a CR that ends `bytes`, `after_cr` is left set.
    pub(super) fn next_event_len(&mut self, bytes: &[u8]) -> Option<usize> {
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
pub(super) fn event_data<'a>(event: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
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
