//! How long an audio file plays, read from its container by `symphonia`'s
//! demuxers (WAV, FLAC, MP3, OGG, MP4/M4A, WebM): the unit transcription is
//! billed in. Nothing is decoded; the length comes from what the container
//! declares (a WAV's data size, FLAC's STREAMINFO, an MP3's Xing/Info frame,
//! an MP4's `moov`, an OGG stream's last page).
//!
//! The gateway reads a file's first bytes as they pass, before the backend
//! starts, and reserves what they declare; some containers only tell from
//! further in (an OGG's last page, an MP4 whose `moov` comes last), and a
//! prefix of those is read as a format with no length yet.

use std::io::Cursor;

use bytes::Bytes;
use symphonia::core::codecs::CODEC_TYPE_NULL;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSource, MediaSourceStream, ReadOnlySource};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// What a file (or its first bytes) says about its length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AudioLength {
    /// Seconds of audio, as the container declares them.
    Seconds(f64),
    /// A container symphonia knows, whose length the bytes read do not tell.
    Unknown,
}

/// The bytes are not audio in a container symphonia reads.
#[derive(Debug, thiserror::Error)]
#[error("not audio in a format Tollgate reads ({0})")]
pub struct UnreadableAudio(String);

/// The length of `file`: the whole file when `whole`, else its first bytes.
pub fn audio_length(file: Bytes, whole: bool) -> Result<AudioLength, UnreadableAudio> {
    // A whole file can be sought in (an OGG's last page, a trailing `moov`);
    // a prefix cannot: reading past it is an error, not a short file.
    let source: Box<dyn MediaSource> = if whole {
        Box::new(Cursor::new(file))
    } else {
        Box::new(ReadOnlySource::new(Cursor::new(file)))
    };
    let stream = MediaSourceStream::new(source, Default::default());
    let probed = symphonia::default::get_probe()
        .format(
            &Hint::new(),
            stream,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| UnreadableAudio(e.to_string()))?;
    let Some(track) = probed
        .format
        .tracks()
        .iter()
        .find(|track| track.codec_params.codec != CODEC_TYPE_NULL)
    else {
        return Err(UnreadableAudio("no audio track".into()));
    };
    let params = &track.codec_params;
    // An encoder's priming and padding (an MP3's LAME tag, Opus's pre-skip)
    // are frames in the container that do not play.
    let frames = params.n_frames.map(|frames| {
        let silent = u64::from(params.delay.unwrap_or(0)) + u64::from(params.padding.unwrap_or(0));
        frames.saturating_sub(silent)
    });
    let seconds = match (frames, params.time_base, params.sample_rate) {
        (Some(frames), Some(base), _) => {
            let time = base.calc_time(frames);
            Some(time.seconds as f64 + time.frac)
        }
        (Some(frames), None, Some(rate)) if rate > 0 => Some(frames as f64 / f64::from(rate)),
        _ => None,
    };
    Ok(match seconds {
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => AudioLength::Seconds(seconds),
        _ => AudioLength::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16-bit mono WAV of `samples` samples at `rate`, written by hand so
    /// the test does not lean on the reader it checks.
    fn wav(rate: u32, samples: u32) -> Vec<u8> {
        let data = samples * 2;
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&(36 + data).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes()); // PCM
        out.extend_from_slice(&1u16.to_le_bytes()); // mono
        out.extend_from_slice(&rate.to_le_bytes());
        out.extend_from_slice(&(rate * 2).to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&data.to_le_bytes());
        out.resize(out.len() + data as usize, 0);
        out
    }

    #[test]
    fn a_wav_header_declares_its_length_whole_or_cut() {
        let file = Bytes::from(wav(16_000, 40_000));
        assert_eq!(
            audio_length(file.clone(), true).unwrap(),
            AudioLength::Seconds(2.5)
        );
        // The header alone says as much.
        assert_eq!(
            audio_length(file.slice(..4096), false).unwrap(),
            AudioLength::Seconds(2.5)
        );
    }

    #[test]
    fn bytes_that_are_not_audio_are_unreadable() {
        assert!(audio_length(Bytes::from_static(b"hello, this is text"), true).is_err());
        assert!(audio_length(Bytes::new(), true).is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Arbitrary bytes, whole or cut, never panic the demuxers.
            #[test]
            fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048), whole in any::<bool>()) {
                let _ = audio_length(Bytes::from(bytes), whole);
            }

            #[test]
            fn any_cut_of_a_wav_is_read_or_refused(cut in 0usize..1000) {
                let file = Bytes::from(wav(8_000, 400));
                let _ = audio_length(file.slice(..cut.min(file.len())), false);
            }
        }
    }
}
