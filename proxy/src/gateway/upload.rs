//! Uploads: `multipart/form-data` bodies carrying an audio file
//! (`/v1/audio/transcriptions`, `/translations`) or images to edit
//! (`/v1/images/edits`), up to `server.max_upload_bytes`.
//!
//! An audio upload is streamed to the backend rather than held. Admission
//! needs two things from the body: the `model` (which backends,
//! which queue) and the file's length (what to reserve). Both are read from
//! the body's head, in `request_filter`: the parts up to the `model` and
//! the file's first [`PROBE_BYTES`], whose container header declares its
//! length. The rest of the body goes on through `request_body_filter`, each
//! chunk fed to the same multipart parser on its way, so a body that breaks
//! its framing (a truncated last part, a second `model` after admission
//! read the first) is cut off before its end reaches the backend, answered
//! 400 and billed nothing.
//!
//! A body whose `model` comes after its file (the order curl and the Node
//! SDK send when the file is listed first) is held until the `model`
//! arrives, within the same limit; the Python SDK sends `model` first.
//!
//! An image edit is read whole before admission: `n`, `size` and `quality`,
//! which weigh what it reserves, may come after its images.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use super::audio_probe::{AudioProber, Probe};
use super::request::{BodyError, BodyReader, Endpoint, ImageOptions, InferenceRequest};
use crate::error::ApiError;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use pingora::proxy::Session;
use tokio::sync::mpsc;

/// How much of the file is read before admission for its header: a WAV's
/// or FLAC's is in the first bytes, an MP3's Xing frame follows its ID3 tag
/// (cover art included), an MP4's index (`moov`) is ~10 bytes per second of
/// AAC when it comes first.
const PROBE_BYTES: usize = 256 * 1024;

/// Below any speech codec's rate (Opus goes down to 6 kbit/s): a file that
/// declares more seconds than its bytes could hold at this rate declares
/// what it is not (a streamed WAV's `0xFFFFFFFF` size, a forged frame
/// count), and is taken as of unknown length.
const MIN_AUDIO_BYTES_PER_SECOND: f64 = 500.0;

/// The slowest an upload may arrive once it holds a GPU slot, on average
/// after [`SLOW_UPLOAD_GRACE`]: 512 kbit/s, a poor mobile uplink. A 25 MiB
/// file then holds its slot at most ~7 minutes; a client trickling a byte a
/// minute would otherwise hold it for good.
const MIN_UPLOAD_BYTES_PER_SECOND: u64 = 64 * 1024;
const SLOW_UPLOAD_GRACE: Duration = Duration::from_secs(10);

/// The most bytes a text field the gateway reads may hold.
const MAX_TEXT_FIELD_BYTES: usize = 64 * 1024;

/// The text fields the gateway reads, each at most once: a second copy
/// (which a backend might take over the one admission used) is refused.
const READ_FIELDS: [&str; 4] = ["model", "n", "size", "quality"];

/// What a part of the form is, for the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// One of [`READ_FIELDS`], by index.
    Field(usize),
    /// The audio `file`, whose head is kept for its length.
    Audio,
    /// An image to edit (`image`, or `image[]` for several).
    Image,
    /// Any other part, passed on unread.
    Other,
}

/// The multipart parser, fed chunk by chunk: `multer` reads from a channel
/// this side fills, and is polled only after each chunk (never awaited), so
/// it runs inside the synchronous stretch of each body filter call.
pub struct FormReader {
    inbox: Option<mpsc::UnboundedSender<Result<Bytes, Infallible>>>,
    multipart: multer::Multipart<'static>,
    field: Option<(Part, multer::Field<'static>)>,
    /// The value of the text field being read.
    text: Vec<u8>,
    /// [`READ_FIELDS`]' values, kept once read.
    fields: [Option<String>; READ_FIELDS.len()],
    images: u32,
    file_started: bool,
    file_ended: bool,
    /// The file's bytes so far.
    file_bytes: u64,
    /// The file's first bytes (up to [`PROBE_BYTES`]), until probed.
    file_head: BytesMut,
    probed: bool,
    /// The closing boundary was read.
    finished: bool,
}

impl FormReader {
    /// A reader for a body of `content_type` (400 unless it is
    /// `multipart/form-data` with a boundary).
    pub fn new(content_type: Option<&str>) -> Result<Self, ApiError> {
        // One boundary only: parsers disagree on which of two wins, and the
        // form admission reads must be the one the backend reads.
        let boundary = content_type
            .filter(|ct| ct.to_ascii_lowercase().matches("boundary=").count() == 1)
            .and_then(|ct| multer::parse_boundary(ct).ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "Send the request as multipart/form-data, as OpenAI's API takes uploads.",
                    None,
                )
            })?;
        let (inbox, mut received) = mpsc::unbounded_channel();
        let chunks = futures_util::stream::poll_fn(move |cx| received.poll_recv(cx));
        Ok(Self {
            inbox: Some(inbox),
            multipart: multer::Multipart::new(chunks, boundary),
            field: None,
            text: Vec::new(),
            fields: Default::default(),
            images: 0,
            file_started: false,
            file_ended: false,
            file_bytes: 0,
            file_head: BytesMut::new(),
            probed: false,
            finished: false,
        })
    }

    /// Reads `chunk` as far as the form goes.
    pub fn feed(&mut self, chunk: Bytes) -> Result<(), ApiError> {
        if let Some(inbox) = &self.inbox {
            // The receiver lives in `self.multipart`: sending cannot fail.
            let _ = inbox.send(Ok(chunk));
        }
        self.read_on()
    }

    /// The body ended: refuses a form that did not end with it.
    pub fn finish(&mut self) -> Result<(), ApiError> {
        self.inbox = None;
        self.read_on()?;
        if self.finished {
            Ok(())
        } else {
            Err(malformed("the form ends before its closing boundary"))
        }
    }

    fn field(&self, name: &str) -> Option<&str> {
        let index = READ_FIELDS.iter().position(|f| *f == name)?;
        self.fields.get(index)?.as_deref()
    }

    /// What an audio upload's admission needs has been read: the `model`,
    /// and the file's header (its first bytes, or all of it).
    fn head_read(&self) -> bool {
        self.field("model").is_some()
            && self.file_started
            && (self.file_ended || self.file_head.len() >= PROBE_BYTES)
    }

    /// Polls the parser until it needs another chunk.
    fn read_on(&mut self) -> Result<(), ApiError> {
        loop {
            if let Some((part, field)) = &mut self.field {
                let part = *part;
                match field.chunk().now_or_never() {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(malformed(e)),
                    Some(Ok(Some(bytes))) => self.take(part, &bytes)?,
                    Some(Ok(None)) => {
                        self.field = None;
                        self.end_part(part)?;
                    }
                }
            } else if self.finished {
                return Ok(());
            } else {
                match self.multipart.next_field().now_or_never() {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(malformed(e)),
                    Some(Ok(None)) => self.finished = true,
                    Some(Ok(Some(field))) => {
                        let part = self.start_part(field.name())?;
                        self.field = Some((part, field));
                    }
                }
            }
        }
    }

    fn start_part(&mut self, name: Option<&str>) -> Result<Part, ApiError> {
        let Some(name) = name else {
            return Err(malformed("a part has no name"));
        };
        if let Some(index) = READ_FIELDS.iter().position(|f| *f == name) {
            if self.fields[index].is_some() {
                return Err(ApiError::bad_request(
                    format!("`{name}` is sent twice; send it once."),
                    Some(READ_FIELDS[index]),
                ));
            }
            return Ok(Part::Field(index));
        }
        Ok(match name {
            "file" if self.file_started => {
                return Err(ApiError::bad_request(
                    "More than one `file`; send one audio file per request.",
                    Some("file"),
                ));
            }
            "file" => {
                self.file_started = true;
                Part::Audio
            }
            "image" | "image[]" => {
                self.images += 1;
                Part::Image
            }
            _ => Part::Other,
        })
    }

    fn take(&mut self, part: Part, bytes: &Bytes) -> Result<(), ApiError> {
        match part {
            Part::Field(index) => {
                if self.text.len() + bytes.len() > MAX_TEXT_FIELD_BYTES {
                    let name = READ_FIELDS[index];
                    return Err(ApiError::bad_request(
                        format!("`{name}` is too long."),
                        Some(name),
                    ));
                }
                self.text.extend_from_slice(bytes);
            }
            Part::Audio => {
                self.file_bytes += bytes.len() as u64;
                if !self.probed {
                    let room = PROBE_BYTES.saturating_sub(self.file_head.len());
                    self.file_head
                        .extend_from_slice(&bytes[..room.min(bytes.len())]);
                }
            }
            Part::Image | Part::Other => {}
        }
        Ok(())
    }

    fn end_part(&mut self, part: Part) -> Result<(), ApiError> {
        match part {
            Part::Field(index) => {
                let name = READ_FIELDS[index];
                let text = std::mem::take(&mut self.text);
                match String::from_utf8(text) {
                    Ok(value) if !value.trim().is_empty() => self.fields[index] = Some(value),
                    _ => {
                        return Err(ApiError::bad_request(
                            format!("`{name}` must be a non-empty string."),
                            Some(name),
                        ));
                    }
                }
            }
            Part::Audio => self.file_ended = true,
            Part::Image | Part::Other => {}
        }
        Ok(())
    }
}

fn malformed(reason: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("The multipart body is malformed: {reason}."), None)
}

/// The rest of an upload, after admission: forwarded chunk by chunk and
/// checked on the way (see the module's doc).
pub struct UploadStream {
    form: FormReader,
    /// The head read before admission, sent ahead of the first chunk.
    head: Bytes,
    /// Pingora replays a retry buffer first (the head's last bytes, when
    /// retry buffering came on while the head was read): that call carries
    /// the whole head instead.
    replays_head: bool,
    head_sent: bool,
    /// When the rest of the body began to flow (the slot was held by then).
    flowing_since: Option<Instant>,
    /// Bytes read so far, against `limit` (a chunked body declares none).
    read: usize,
    limit: usize,
    /// Why the upload was cut off, for the answer.
    pub refused: Option<ApiError>,
}

impl UploadStream {
    /// Some of the body went upstream: a retry could not send it again.
    pub fn started(&self) -> bool {
        self.head_sent
    }

    /// One call of `request_body_filter`: puts the head before the first
    /// chunk, and checks each chunk before it goes.
    pub fn pass(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Result<(), ApiError> {
        let fresh = if !self.head_sent && self.replays_head {
            body.take();
            None
        } else {
            body.take()
        };
        let since = *self.flowing_since.get_or_insert_with(Instant::now);
        if let Some(chunk) = &fresh {
            self.read += chunk.len();
            if self.read > self.limit {
                return Err(ApiError::BodyTooLarge { limit: self.limit });
            }
            let elapsed = since.elapsed();
            if elapsed > SLOW_UPLOAD_GRACE
                && (self.read as f64) < elapsed.as_secs_f64() * MIN_UPLOAD_BYTES_PER_SECOND as f64
            {
                return Err(ApiError::UploadTooSlow {
                    bytes_per_second: MIN_UPLOAD_BYTES_PER_SECOND,
                });
            }
            self.form.feed(chunk.clone())?;
        }
        if end_of_stream {
            self.form.finish()?;
        }
        *body = match (self.head_sent, fresh) {
            (true, fresh) => fresh,
            (false, None) => Some(self.head.clone()),
            (false, Some(chunk)) => Some(Bytes::from([self.head.as_ref(), &chunk].concat())),
        };
        self.head_sent = true;
        Ok(())
    }
}

/// An upload read as far as admission needs.
pub struct Upload {
    pub request: InferenceRequest,
    /// The rest of the body, when it did not end in the head.
    pub stream: Option<UploadStream>,
}

/// Reads an upload's head (see the module's doc), or all of it when
/// `whole` (a job's, which is stored), and resolves its request.
pub async fn read_upload(
    session: &mut Session,
    endpoint: Endpoint,
    limit: usize,
    prober: &AudioProber,
    whole: bool,
) -> Result<Upload, BodyError> {
    let content_type = session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let mut form = FormReader::new(content_type)?;
    let mut reader = BodyReader::start(session, limit).await?;
    let most_bytes = reader.declared.unwrap_or(limit);
    let mut head = BytesMut::new();
    let streams = endpoint != Endpoint::ImageEdits && !whole;
    let ended = loop {
        if streams && form.head_read() {
            break false;
        }
        match reader.next(session).await? {
            Some(chunk) => {
                head.extend_from_slice(&chunk);
                form.feed(chunk)?;
            }
            None => {
                form.finish()?;
                break true;
            }
        }
    };
    if ended {
        BodyReader::check_replayable(session, head.len())?;
    }
    let Some(model) = form.field("model").map(str::to_owned) else {
        return Err(
            ApiError::bad_request("You must provide a `model` parameter.", Some("model")).into(),
        );
    };
    let head = head.freeze();
    let request = if endpoint == Endpoint::ImageEdits {
        image_edit(&form, model, head.clone())?
    } else {
        let seconds = audio_seconds(&mut form, most_bytes, prober).await?;
        InferenceRequest::upload(endpoint, model, head.clone(), seconds)
    };
    let stream = (!ended).then(|| UploadStream {
        form,
        head: head.clone(),
        replays_head: session.get_retry_buffer().is_some(),
        head_sent: false,
        flowing_since: None,
        read: 0,
        limit: limit.saturating_sub(head.len()),
        refused: None,
    });
    Ok(Upload { request, stream })
}

/// The length an audio upload's file declares, from its head, when it is
/// plausible for a file of at most `most_bytes`.
async fn audio_seconds(
    form: &mut FormReader,
    most_bytes: usize,
    prober: &AudioProber,
) -> Result<Option<f64>, ApiError> {
    if !form.file_started {
        return Err(ApiError::bad_request(
            "Missing required parameter `file`.",
            Some("file"),
        ));
    }
    // Whole only when every byte was kept: a file cut at the head's size
    // is a prefix (its OGG "last page", its MP4 index are not there).
    let whole = form.file_ended && form.file_bytes <= PROBE_BYTES as u64;
    let most = if form.file_ended {
        form.file_bytes
    } else {
        most_bytes as u64
    };
    let head = form.file_head.split().freeze();
    form.probed = true;
    match prober.probe(&head, whole).await {
        Probe::Seconds(seconds)
            if seconds > 0.0 && seconds <= most as f64 / MIN_AUDIO_BYTES_PER_SECOND =>
        {
            Ok(Some(seconds))
        }
        Probe::Seconds(_) | Probe::Unknown => Ok(None),
        // The file's first bytes only: a header longer than them (cover
        // art before an MP3's first frame) is no proof of a bad file; the
        // backend judges it, and its answer is billed by its own figure.
        Probe::Unreadable(_) if !whole => Ok(None),
        Probe::Unreadable(why) => Err(ApiError::bad_request(
            format!("`file` could not be read as audio: {why}."),
            Some("file"),
        )),
    }
}

/// An image edit, read whole: `n` images of its `size` and `quality`.
fn image_edit(form: &FormReader, model: String, body: Bytes) -> Result<InferenceRequest, ApiError> {
    if form.images == 0 {
        return Err(ApiError::bad_request(
            "Missing required parameter `image`.",
            Some("image"),
        ));
    }
    let n = match form.field("n") {
        None => 1,
        Some(n) => n
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| ApiError::bad_request("`n` must be a positive integer.", Some("n")))?,
    };
    let mut request = InferenceRequest::upload(Endpoint::ImageEdits, model, body, None);
    request.sequences = n;
    request.image = ImageOptions {
        size: form.field("size").map(str::to_owned),
        quality: form.field("quality").map(str::to_owned),
    };
    Ok(request)
}

#[cfg(test)]
mod tests {
    use tollgate_testkit::multipart::form;

    use super::*;

    fn reader() -> FormReader {
        FormReader::new(Some("multipart/form-data; boundary=B")).unwrap()
    }

    /// Feeds `body` in chunks of `size` bytes, then ends it.
    fn read(body: &[u8], size: usize) -> Result<FormReader, ApiError> {
        let mut form = reader();
        for chunk in body.chunks(size) {
            form.feed(Bytes::copy_from_slice(chunk))?;
        }
        form.finish()?;
        Ok(form)
    }

    #[test]
    fn fields_are_read_whatever_the_chunking() {
        let body = form(&[("model", b"whisper"), ("file", b"RIFF....")], true);
        for size in [1, 3, 7, 64, body.len()] {
            let form = read(&body, size).unwrap();
            assert_eq!(form.field("model"), Some("whisper"));
            assert!(form.file_started && form.file_ended && form.finished);
            assert_eq!(&form.file_head[..], b"RIFF....");
        }
    }

    #[test]
    fn a_form_without_its_closing_boundary_is_refused() {
        let body = form(&[("model", b"whisper"), ("file", b"RIFF....")], false);
        assert!(read(&body, 5).is_err());
        // Cut inside the file, too.
        let whole = form(&[("model", b"whisper"), ("file", b"RIFF....")], true);
        assert!(read(&whole[..whole.len() - 12], 5).is_err());
    }

    #[test]
    fn a_second_model_or_file_is_refused() {
        let body = form(&[("model", b"a"), ("file", b"x"), ("model", b"b")], true);
        assert!(read(&body, 4).is_err());
        let body = form(&[("model", b"a"), ("file", b"x"), ("file", b"y")], true);
        assert!(read(&body, 4).is_err());
    }

    #[test]
    fn a_body_that_is_not_multipart_is_refused() {
        assert!(FormReader::new(Some("application/json")).is_err());
        assert!(FormReader::new(Some("multipart/form-data; boundary=B; boundary=C")).is_err());
        assert!(FormReader::new(None).is_err());
        assert!(read(b"not a form at all", 4).is_err());
    }

    #[test]
    fn the_stream_sends_the_head_before_its_first_chunk_once() {
        let body = form(&[("model", b"m"), ("file", b"0123456789")], true);
        let (head, rest) = body.split_at(60);
        let mut form = reader();
        form.feed(Bytes::copy_from_slice(head)).unwrap();
        let mut stream = UploadStream {
            form,
            head: Bytes::copy_from_slice(head),
            replays_head: false,
            head_sent: false,
            flowing_since: None,
            read: 0,
            limit: 1 << 20,
            refused: None,
        };
        let mut sent = Vec::new();
        let (a, b) = rest.split_at(5);
        for (chunk, end) in [(a, false), (b, true)] {
            let mut piece = Some(Bytes::copy_from_slice(chunk));
            stream.pass(&mut piece, end).unwrap();
            sent.extend_from_slice(&piece.unwrap());
        }
        assert_eq!(sent, body);
    }

    /// Before: once its slot was granted, an upload could trickle a byte a
    /// minute and hold the slot for as long as it liked.
    #[test]
    fn an_upload_slower_than_the_floor_is_cut_off_after_the_grace() {
        let body = form(&[("model", b"m"), ("file", &[0u8; 4096])], true);
        let (head, rest) = body.split_at(100);
        let mut form_reader = reader();
        form_reader.feed(Bytes::copy_from_slice(head)).unwrap();
        let mut stream = UploadStream {
            form: form_reader,
            head: Bytes::copy_from_slice(head),
            replays_head: false,
            head_sent: true,
            // Flowing for 20 s, and only a few KiB so far.
            flowing_since: Instant::now().checked_sub(Duration::from_secs(20)),
            read: 0,
            limit: 1 << 20,
            refused: None,
        };
        let mut piece = Some(Bytes::copy_from_slice(&rest[..10]));
        assert!(matches!(
            stream.pass(&mut piece, false),
            Err(ApiError::UploadTooSlow { .. })
        ));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Arbitrary bytes in arbitrary chunks never panic the reader.
            #[test]
            fn any_body_is_read_or_refused(body in proptest::collection::vec(any::<u8>(), 0..512), size in 1usize..64) {
                let _ = read(&body, size);
            }
        }
    }
}
