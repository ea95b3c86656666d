//! A backend's answer, any bytes in any chunks: the capture must never panic
//! and, when it strips nothing, pass every byte through unchanged; the same
//! bytes must read the same however they are cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_metering::capture::ResponseCapture;

/// What the client got and what was read.
fn run<'a>(streaming: bool, strip: bool, pieces: impl Iterator<Item = &'a [u8]>) -> (Vec<u8>, String) {
    let mut capture = ResponseCapture::new(streaming, strip);
    let mut client = Vec::new();
    for piece in pieces {
        match capture.feed(piece) {
            Some(out) => client.extend_from_slice(&out),
            None => client.extend_from_slice(piece),
        }
    }
    if let Some(rest) = capture.finish() {
        client.extend_from_slice(&rest);
    }
    let read = format!(
        "{:?} {:?} {} {} {}",
        capture.usage(),
        capture.completion_texts().iter().collect::<Vec<_>>(),
        capture.completed(),
        capture.backend_error(),
        capture.overflowed()
    );
    (client, read)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else {
        return;
    };
    let streaming = control & 1 == 1;
    let strip = control & 2 == 2;
    let chunk = usize::from(control >> 2) + 1;
    let (whole_client, whole_read) = run(streaming, strip, std::iter::once(body));
    let (cut_client, cut_read) = run(streaming, strip, body.chunks(chunk));
    if !strip {
        assert_eq!(whole_client, body);
    }
    assert_eq!(whole_client, cut_client);
    assert_eq!(whole_read, cut_read);
});
