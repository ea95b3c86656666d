//! OpenAI's rate-limit headers: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`,
//! on every answer to an admitted or rate-limited request, and `Retry-After`.

use std::time::Duration;

use super::limits::{Window, Windows};

/// The header pairs for `windows` (nothing for a kind without a limit).
pub fn rate_limit_headers(windows: &Windows) -> Vec<(&'static str, String)> {
    let mut headers = Vec::with_capacity(6);
    let mut add = |window: &Option<Window>, names: [&'static str; 3]| {
        if let Some(w) = window {
            headers.push((names[0], w.limit.to_string()));
            headers.push((names[1], w.remaining.to_string()));
            headers.push((names[2], reset(w.reset)));
        }
    };
    add(
        &windows.requests,
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
    );
    add(
        &windows.tokens,
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    );
    headers
}

/// `Retry-After` in whole seconds, rounded up (HTTP allows no fractions).
pub fn retry_after(wait: Duration) -> String {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
        .max(1)
        .to_string()
}

/// A reset time as OpenAI writes it (Go's duration format): "20ms", "1s",
/// "6m0s", "1h2m3.5s".
fn reset(wait: Duration) -> String {
    let ms = wait.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let seconds = format!("{}.{:03}", rest / 1000, rest % 1000);
    let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_reads_like_openai() {
        assert_eq!(reset(Duration::from_millis(20)), "20ms");
        assert_eq!(reset(Duration::from_secs(1)), "1s");
        assert_eq!(reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset(Duration::from_millis(3_723_500)), "1h2m3.5s");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after(Duration::from_millis(1)), "1");
        assert_eq!(retry_after(Duration::from_millis(1001)), "2");
        assert_eq!(retry_after(Duration::from_secs(30)), "30");
    }

    #[test]
    fn only_limited_kinds_get_headers() {
        let windows = Windows {
            requests: Some(Window {
                limit: 60,
                remaining: 59,
                reset: Duration::from_secs(1),
            }),
            tokens: None,
        };
        let headers = rate_limit_headers(&windows);
        assert_eq!(
            headers,
            [
                ("x-ratelimit-limit-requests", "60".to_owned()),
                ("x-ratelimit-remaining-requests", "59".to_owned()),
                ("x-ratelimit-reset-requests", "1s".to_owned()),
            ]
        );
    }
}
