//! What a Triton backend answers, any bytes in any chunks, streamed or whole:
//! translated into OpenAI's shapes or reported as a backend error, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_backends::protocol::triton::{
    AnswerMeta, Endpoint, Exchange, StreamTranscoder, translate_error, translate_response,
};
use tollgate_metering::tokens::Encoding;

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else {
        return;
    };
    let exchange = Exchange {
        endpoint: if control & 1 == 1 {
            Endpoint::ChatCompletions
        } else {
            Endpoint::Completions
        },
        stream: control & 2 == 2,
        include_usage: control & 4 == 4,
        max_tokens: u32::from(control >> 3),
    };
    let meta = AnswerMeta {
        id: "chatcmpl-fuzz".to_owned(),
        created: 0,
        model: "m".to_owned(),
        prompt_tokens: 1,
        encoding: Encoding::Cl100k,
    };
    let mut transcoder = StreamTranscoder::new(exchange, &meta);
    for piece in body.chunks(usize::from(control % 7) + 1) {
        transcoder.feed(piece);
    }
    transcoder.finish();
    let _ = transcoder.usage();
    let _ = translate_response(exchange, &meta, body);
    let _ = translate_error(500, body).openai_body();
});
