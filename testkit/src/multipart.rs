//! Hand-made `multipart/form-data` bodies, closed or not, for the upload
//! tests that must send forms an HTTP client would refuse to build.

/// The boundary of every form built here.
pub const BOUNDARY: &str = "B";

/// A form of `parts` (name, value); a part named `file` or `image` gets a
/// file name. The closing boundary is left off unless `close`.
pub fn form(parts: &[(&str, &[u8])], close: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in parts {
        let filename = match *name {
            "file" => "; filename=\"a.wav\"",
            "image" => "; filename=\"a.png\"",
            _ => "",
        };
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    if close {
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    }
    body
}
