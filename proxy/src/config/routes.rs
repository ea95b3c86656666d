//! `[[routes]]`: custom GPU routes for servers that do not speak OpenAI (an
//! avatar renderer, AUTOMATIC1111's `/sdapi/v1/txt2img`). A request whose
//! path starts with a route's `path` is authenticated, admitted, queued and
//! metered like any other, then forwarded as it came to a backend serving the
//! route's `model`, and billed in the route's unit: requests, GPU-seconds, or
//! a figure the backend reports in a header or its JSON answer.

use serde::Deserialize;
use tollgate_metering::units::UnitKind;

use super::{ConfigError, invalid};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    path: String,
    model: String,
    unit: UnitKind,
    reserve: Option<u64>,
    reported: Option<ReportedUnits>,
    max_body_bytes: Option<usize>,
    #[serde(default)]
    idempotent: bool,
}

/// Where a backend reports the units of its answer: a response header, or a
/// number in its JSON answer at a JSON pointer (RFC 6901, `/usage/seconds`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReportedUnits {
    Header(String),
    Json(String),
}

/// One custom route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomRoute {
    /// Requests at this path or under it (`/sdapi/v1/txt2img`, `/v1/avatar/`).
    pub path: String,
    /// The model whose backends serve it (they list it in `models`).
    pub model: String,
    /// `requests` (one per answered request) or `gpu_seconds` (how long the
    /// request held a backend slot, measured by Tollgate, rounded up).
    pub unit: UnitKind,
    /// Units reserved before forwarding, against the tier's quota in `unit`:
    /// 1 for `requests`; for `gpu_seconds` or a reported unit, the most one
    /// request is expected to use.
    pub reserve: u64,
    /// The backend reports the units (any kind but tokens); settled to its
    /// figure, rounded up.
    pub reported: Option<ReportedUnits>,
    /// Largest request body (413 above it); the server's `max_body_bytes`
    /// unless set. The body is read whole before the request is admitted.
    pub max_body_bytes: usize,
    /// Running a request twice does no harm (a read, a deterministic
    /// render): a job whose gateway died after sending it is run again
    /// instead of failed.
    pub idempotent: bool,
}

impl CustomRoute {
    /// Whether `path` is this route's: the route's path itself, or below it.
    pub fn matches(&self, path: &str) -> bool {
        under(path.trim_end_matches('/'), &self.path)
    }
}

/// `path` is `base` or below it.
fn under(path: &str, base: &str) -> bool {
    path.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn overlap(a: &str, b: &str) -> bool {
    under(a, b) || under(b, a)
}

/// The gateway's own paths, which a custom route may not take over.
const RESERVED: [&str; 4] = ["/v1", "/healthz", "/readyz", "/stripe"];

pub(super) fn validate(
    raw: Vec<RawRoute>,
    served: &[&str],
    server_max_body_bytes: usize,
) -> Result<Vec<CustomRoute>, ConfigError> {
    let mut routes: Vec<CustomRoute> = Vec::new();
    for (i, route) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("routes[{i}].{field}");
        let path = route.path.trim_end_matches('/').to_owned();
        let valid = path.starts_with('/')
            && path.len() > 1
            && path
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"?#%".contains(&b));
        if !valid {
            return Err(invalid(
                key("path"),
                "must be a path like \"/sdapi/v1/txt2img\"",
            ));
        }
        if RESERVED.iter().any(|own| overlap(&path, own)) {
            return Err(invalid(
                key("path"),
                "overlaps the gateway's own routes (/v1, /healthz, /readyz, /stripe)",
            ));
        }
        if let Some(other) = routes.iter().find(|r| overlap(&path, &r.path)) {
            return Err(invalid(
                key("path"),
                format!("overlaps the route at {}", other.path),
            ));
        }
        if !served.contains(&route.model.as_str()) {
            return Err(invalid(key("model"), "no backend serves this model"));
        }
        match &route.reported {
            Some(ReportedUnits::Header(name))
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() =>
            {
                return Err(invalid(key("reported.header"), "must be a header name"));
            }
            Some(ReportedUnits::Json(pointer)) if !pointer.starts_with('/') => {
                return Err(invalid(
                    key("reported.json"),
                    "must be a JSON pointer like \"/usage/seconds\"",
                ));
            }
            _ => {}
        }
        let reserve = match (route.unit, &route.reported, route.reserve) {
            (UnitKind::Tokens, _, _) => {
                return Err(invalid(
                    key("unit"),
                    "a custom route bills requests, gpu_seconds or a reported unit, not tokens",
                ));
            }
            (_, _, Some(0)) => return Err(invalid(key("reserve"), "must be at least 1")),
            (UnitKind::Requests, None, Some(r)) if r != 1 => {
                return Err(invalid(
                    key("reserve"),
                    "a request is one unit: leave reserve out",
                ));
            }
            (UnitKind::Requests | UnitKind::GpuSeconds, None, reserve) | (_, Some(_), reserve) => {
                reserve.unwrap_or(1)
            }
            (other, None, _) => {
                return Err(invalid(
                    key("unit"),
                    format!("{other} needs `reported` (where the backend gives the figure)"),
                ));
            }
        };
        routes.push(CustomRoute {
            path,
            model: route.model,
            unit: route.unit,
            reserve,
            reported: route.reported,
            max_body_bytes: match route.max_body_bytes {
                Some(0) => return Err(invalid(key("max_body_bytes"), "must be at least 1")),
                Some(limit) => limit,
                None => server_max_body_bytes,
            },
            idempotent: route.idempotent,
        });
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::error;

    #[test]
    fn route_mistakes_name_the_key() {
        let route = |lines: &str| format!("[[routes]]\n{lines}\n");
        let ok = "path = \"/sdapi/v1/txt2img\"\nmodel = \"sim-model\"\nunit = \"requests\"";
        assert!(
            error(&route(ok)).starts_with("no error"),
            "{}",
            error(&route(ok))
        );
        for (lines, key) in [
            (
                "path = \"/v1/avatar\"\nmodel = \"sim-model\"\nunit = \"requests\"",
                "routes[0].path",
            ),
            (
                "path = \"avatar\"\nmodel = \"sim-model\"\nunit = \"requests\"",
                "routes[0].path",
            ),
            (
                "path = \"/avatar\"\nmodel = \"nope\"\nunit = \"requests\"",
                "routes[0].model",
            ),
            (
                "path = \"/avatar\"\nmodel = \"sim-model\"\nunit = \"images\"",
                "routes[0].unit",
            ),
            (
                "path = \"/avatar\"\nmodel = \"sim-model\"\nunit = \"tokens\"",
                "routes[0].unit",
            ),
            (
                "path = \"/avatar\"\nmodel = \"sim-model\"\nunit = \"images\"\nreported = { json = \"n\" }",
                "routes[0].reported.json",
            ),
            (
                "path = \"/avatar\"\nmodel = \"sim-model\"\nunit = \"gpu_seconds\"\nreserve = 0",
                "routes[0].reserve",
            ),
        ] {
            let err = error(&route(lines));
            assert!(err.contains(key), "{lines:?} → {err}");
        }
        let twice = format!("{}{}", route(ok), route(ok));
        assert!(
            error(&twice).contains("routes[1].path"),
            "{}",
            error(&twice)
        );
    }

    #[test]
    fn a_route_matches_its_path_and_below_only() {
        let route = CustomRoute {
            path: "/sdapi/v1/txt2img".to_owned(),
            model: "sd".to_owned(),
            unit: UnitKind::Requests,
            reserve: 1,
            reported: None,
            max_body_bytes: 1,
            idempotent: false,
        };
        assert!(route.matches("/sdapi/v1/txt2img"));
        assert!(route.matches("/sdapi/v1/txt2img/"));
        assert!(route.matches("/sdapi/v1/txt2img/x"));
        assert!(!route.matches("/sdapi/v1/txt2imgx"));
        assert!(!route.matches("/sdapi/v1"));
        assert!(overlap("/v1", "/v1/avatar") && !overlap("/v1x", "/v1"));
    }
}
