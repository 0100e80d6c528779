//! Wire-format decoding for the token endpoint: `multipart/form-data` (RFC 7578 on RFC 2046
//! §5.1.1), media-type parameters and quoted-strings (RFC 9110 §5.6), standard base64
//! (RFC 4648 §4) and `application/x-www-form-urlencoded` values. Pure functions on bytes and
//! strings, the stand-in's own on purpose (see the module doc); which of them a request
//! needs is decided in `token`.

/// A parameter of a media type (`boundary` of `multipart/form-data; boundary="x"`),
/// unquoted (RFC 9110 §5.6.6, §5.6.4).
pub(super) fn media_type_param(content_type: &str, wanted: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case(wanted)
            .then(|| unquote(value.trim()))
    })
}

/// Removes the quotes and backslash escapes of an RFC 9110 §5.6.4 quoted-string; a token
/// is returned unchanged.
fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(escaped) = chars.next() {
                out.push(escaped);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses `multipart/form-data` (RFC 7578 on RFC 2046 §5.1.1) into (name, value) pairs.
///
/// The body is: an optional preamble; `--boundary` delimiters, each preceded by CRLF
/// except at the very start; after a delimiter either `--` (the close delimiter, then an
/// ignored epilogue) or optional transport padding and CRLF, the part's header lines, an
/// empty line and the content up to the next CRLF `--boundary`. Every part needs
/// `Content-Disposition: form-data; name="..."`; `filename` and the part's Content-Type
/// are ignored. Line ends must be CRLF, as the RFCs require: a client that sends bare LF
/// is a bug worth seeing.
pub(super) fn parse_multipart(
    body: &[u8],
    boundary: &str,
) -> Result<Vec<(String, String)>, String> {
    if boundary.is_empty() || boundary.len() > 70 {
        return Err("The multipart boundary must be 1 to 70 characters (RFC 2046 §5.1.1).".into());
    }
    let delimiter = format!("--{boundary}").into_bytes();
    let crlf_delimiter = [b"\r\n".as_slice(), &delimiter].concat();
    let mut pos = if body.starts_with(&delimiter) {
        delimiter.len()
    } else {
        find(body, &crlf_delimiter).ok_or("The multipart body has no boundary delimiter.")?
            + crlf_delimiter.len()
    };
    let mut fields = Vec::new();
    loop {
        let rest = &body[pos..];
        if rest.starts_with(b"--") {
            return Ok(fields);
        }
        // Transport padding (RFC 2046 §5.1.1: LWSP after the boundary), then CRLF.
        let padding = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        if !rest[padding..].starts_with(b"\r\n") {
            return Err("A multipart boundary is not followed by CRLF.".into());
        }
        pos += padding + 2;

        let mut name = None;
        loop {
            let line_len = find(&body[pos..], b"\r\n")
                .ok_or("A multipart part's headers do not end with an empty line.")?;
            let line = &body[pos..pos + line_len];
            pos += line_len + 2;
            if line.is_empty() {
                break;
            }
            let line = std::str::from_utf8(line)
                .map_err(|_| "A multipart part header is not UTF-8.".to_owned())?;
            let (header_name, value) = line
                .split_once(':')
                .ok_or("A multipart part header has no colon.")?;
            if header_name
                .trim()
                .eq_ignore_ascii_case("content-disposition")
            {
                name = form_data_name(value);
            }
        }
        let name = name.ok_or(
            "A multipart part has no Content-Disposition: form-data with a name (RFC 7578 §4.2).",
        )?;
        let content_len = find(&body[pos..], &crlf_delimiter)
            .ok_or("The multipart body is not terminated by a close delimiter.")?;
        let value = String::from_utf8(body[pos..pos + content_len].to_vec())
            .map_err(|_| format!("The multipart field {name} is not UTF-8 text."))?;
        fields.push((name, value));
        pos += content_len + crlf_delimiter.len();
    }
}

/// The `name` of `Content-Disposition: form-data; name="..."`, or None if it is not
/// form-data or has no name. Splits on `;` outside quoted strings.
fn form_data_name(value: &str) -> Option<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                params.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    params.push(current);
    let mut params = params.iter();
    if !params.next()?.trim().eq_ignore_ascii_case("form-data") {
        return None;
    }
    params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("name")
            .then(|| unquote(value.trim()))
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Standard base64 (RFC 4648 §4); padding optional.
pub(super) fn decode_base64(input: &str) -> Option<Vec<u8>> {
    let data = input.trim_end_matches('=');
    if input.len() - data.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for byte in data.bytes() {
        let sextet = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // One character alone (6 bits) cannot encode a byte.
    (bits < 6).then_some(out)
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space, `%XX` a
/// byte. A `%` not followed by two hex digits is kept as is, as browsers do.
pub(super) fn form_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
                if let (Some(high), Some(low)) = (hex(i + 1), hex(i + 2)) {
                    out.push(((high << 4) | low) as u8);
                    i += 3;
                    continue;
                }
                out.push(byte);
            }
            _ => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn multipart_with_preamble_padding_and_epilogue() {
        let body = b"preamble\r\n--XyZ  \r\n\
            Content-Disposition: form-data; name=\"grant_type\"\r\n\r\n\
            client_credentials\r\n--XyZ\r\n\
            content-disposition: FORM-DATA; name=\"semi;colon\"; filename=\"a.txt\"\r\n\
            Content-Type: text/plain\r\n\r\n\
            line1\r\nline2\r\n--XyZ--\r\nepilogue";
        let fields = parse_multipart(body, "XyZ").unwrap();
        assert_eq!(
            fields,
            vec![
                ("grant_type".to_owned(), "client_credentials".to_owned()),
                ("semi;colon".to_owned(), "line1\r\nline2".to_owned()),
            ]
        );
    }

    #[test]
    fn multipart_starting_at_the_first_byte_with_empty_value() {
        let body = b"--b\r\nContent-Disposition: form-data; name=scope\r\n\r\n\r\n--b--";
        assert_eq!(
            parse_multipart(body, "b").unwrap(),
            vec![("scope".to_owned(), String::new())]
        );
    }

    #[test]
    fn multipart_errors() {
        let unterminated = b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue";
        assert!(parse_multipart(unterminated, "b").is_err());
        let bare_lf = b"--b\nContent-Disposition: form-data; name=\"a\"\n\nvalue\n--b--";
        assert!(parse_multipart(bare_lf, "b").is_err());
        let no_name = b"--b\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--b--";
        assert!(parse_multipart(no_name, "b").is_err());
        assert!(parse_multipart(b"no delimiter at all", "b").is_err());
        assert!(parse_multipart(b"--\r\n", "").is_err());
    }

    #[test]
    fn boundary_parameter_is_unquoted() {
        assert_eq!(
            media_type_param("multipart/form-data; BOUNDARY=\"a b\\\"c\"", "boundary").as_deref(),
            Some("a b\"c")
        );
        assert_eq!(
            media_type_param("multipart/form-data;boundary=abc", "boundary").as_deref(),
            Some("abc")
        );
        assert_eq!(media_type_param("multipart/form-data", "boundary"), None);
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(decode_base64("").unwrap(), b"");
        assert_eq!(decode_base64("Zg==").unwrap(), b"f");
        assert_eq!(decode_base64("Zm8=").unwrap(), b"fo");
        assert_eq!(decode_base64("Zm9v").unwrap(), b"foo");
        assert_eq!(decode_base64("Zm9vYg").unwrap(), b"foob");
        assert_eq!(decode_base64("+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
        assert!(decode_base64("Z").is_none());
        assert!(decode_base64("Zm9v!").is_none());
        assert!(decode_base64("Zg===").is_none());
    }

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a+b%3Ac%25").as_deref(), Some("a b:c%"));
        assert_eq!(form_decode("100%").as_deref(), Some("100%"));
        assert_eq!(form_decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(form_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(form_decode("%FF"), None);
    }
}
