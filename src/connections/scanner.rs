//! Follows a request head byte by byte as it arrives: where it ends, whether it stays within the
//! size and line limits, and whether it is well formed HTTP/1.x (RFC 9112 §3 and §5).
//!
//! Pingora's parser refuses a malformed head with an empty 400. Checking the same rules here,
//! before Pingora sees the head, lets the client get a 400 in the Anthropic shape that says what
//! was wrong. The rules are Pingora's (httparse's) or stricter, never looser: a head this accepts
//! is one Pingora parses.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    UriTooLong,
    HeaderTooLarge,
    TooManyHeaders,
    /// CONNECT: this gateway is no tunnel (Pingora would answer an empty 405).
    Connect,
    /// What is wrong with the head.
    Malformed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// More bytes are needed.
    Incomplete,
    /// The head ended after this many bytes of the data just fed.
    Complete(usize),
    Refused(Violation),
}

/// Where in the head the next byte falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before the request line (empty lines there are ignored, RFC 9112 §2.2).
    Start,
    Method,
    Target,
    /// Matching `HTTP/1.` then `0` or `1`; the index of the next byte.
    Version(u8),
    VersionEnd,
    LineStart,
    Name,
    Value,
}

const MALFORMED_REQUEST_LINE: &str = "the request line is not `METHOD target HTTP/1.1`";

#[derive(Debug, Clone)]
pub struct HeadScanner {
    max_bytes: usize,
    max_headers: usize,
    at: At,
    /// A CR was seen; only LF may follow.
    cr: bool,
    bytes: usize,
    /// Header lines so far.
    headers: usize,
    /// The method's first bytes (enough to tell CONNECT).
    method: [u8; 8],
    method_len: usize,
    /// The current header name's first bytes, lowercased (enough to tell the framing headers).
    name: [u8; 17],
    name_len: usize,
    content_length: bool,
    transfer_encoding: bool,
    /// The value being read is Content-Length's: digits only (RFC 9110 §8.6).
    in_content_length: bool,
    /// A digit of it has been seen; white space after its digits has been seen.
    content_length_digits: bool,
    after_digits: bool,
}

impl HeadScanner {
    pub fn new(max_bytes: usize, max_headers: usize) -> Self {
        HeadScanner {
            max_bytes,
            max_headers,
            at: At::Start,
            cr: false,
            bytes: 0,
            headers: 0,
            method: [0; 8],
            method_len: 0,
            name: [0; 17],
            name_len: 0,
            content_length: false,
            transfer_encoding: false,
            in_content_length: false,
            content_length_digits: false,
            after_digits: false,
        }
    }

    /// Starts over for the next request's head.
    pub fn reset(&mut self) {
        *self = HeadScanner::new(self.max_bytes, self.max_headers);
    }

    pub fn feed(&mut self, data: &[u8]) -> Scan {
        let mut i = 0;
        while i < data.len() {
            // Most of a head is runs of ordinary bytes inside a name, a value or the target: take
            // each run at once, through a table, and leave only delimiters to `step`.
            if !self.cr {
                let class = match self.at {
                    // Content-Length's value is checked byte by byte below.
                    At::Value if self.in_content_length => None,
                    At::Value => Some(VALUE),
                    At::Name => Some(TCHAR),
                    At::Target => Some(TARGET),
                    _ => None,
                };
                if let Some(class) = class {
                    let run = data[i..].iter().take_while(|&&b| class & CLASSES[usize::from(b)] != 0).count();
                    if self.at == At::Name {
                        // The name's first bytes, lowercased, tell the framing headers.
                        for &b in &data[i..i + run] {
                            if self.name_len < self.name.len() {
                                self.name[self.name_len] = b.to_ascii_lowercase();
                            }
                            self.name_len += 1;
                        }
                    }
                    i += run;
                    self.bytes += run;
                    if self.bytes > self.max_bytes {
                        return Scan::Refused(if self.at == At::Target {
                            Violation::UriTooLong
                        } else {
                            Violation::HeaderTooLarge
                        });
                    }
                    if i == data.len() {
                        break;
                    }
                }
            }
            let b = data[i];
            i += 1;
            self.bytes += 1;
            if self.bytes > self.max_bytes {
                let still_on_request_line = matches!(self.at, At::Start | At::Method | At::Target | At::Version(_));
                return Scan::Refused(if still_on_request_line {
                    Violation::UriTooLong
                } else {
                    Violation::HeaderTooLarge
                });
            }
            match self.step(b) {
                Ok(true) => return Scan::Complete(i),
                Ok(false) => {}
                Err(v) => return Scan::Refused(v),
            }
        }
        Scan::Incomplete
    }

    /// One byte; `Ok(true)` when it ends the head.
    fn step(&mut self, b: u8) -> Result<bool, Violation> {
        use Violation::Malformed;
        if self.cr {
            if b != b'\n' {
                return Err(Malformed("a CR in the request head is not followed by LF"));
            }
            self.cr = false;
        } else if b == b'\r' {
            self.cr = true;
            return Ok(false);
        }
        self.at = match (self.at, b) {
            (At::Start, b'\n') => At::Start,
            (At::Start | At::Method, b) if is_tchar(b) => {
                if self.method_len < self.method.len() {
                    self.method[self.method_len] = b;
                }
                self.method_len += 1;
                At::Method
            }
            (At::Method, b' ') if &self.method[..self.method_len.min(8)] == b"CONNECT" && self.method_len == 7 => {
                return Err(Violation::Connect)
            }
            (At::Method, b' ') => At::Target,
            (At::Start | At::Method, _) => return Err(Malformed(MALFORMED_REQUEST_LINE)),
            (At::Target, b' ') => At::Version(0),
            (At::Target, b) if b > b' ' && b != 0x7f => At::Target,
            (At::Target, _) => return Err(Malformed(MALFORMED_REQUEST_LINE)),
            (At::Version(i), b) if i < 7 && b == b"HTTP/1."[usize::from(i)] => At::Version(i + 1),
            (At::Version(7), b'0' | b'1') => At::VersionEnd,
            (At::VersionEnd, b'\n') => At::LineStart,
            (At::Version(_) | At::VersionEnd, _) => return Err(Malformed(MALFORMED_REQUEST_LINE)),
            (At::LineStart, b'\n') => return Ok(true),
            (At::LineStart, b' ' | b'\t') => {
                return Err(Malformed("a header line starts with whitespace (obsolete line folding)"))
            }
            (At::LineStart | At::Name, b) if is_tchar(b) => {
                if self.at == At::LineStart {
                    self.name_len = 0;
                }
                if self.name_len < self.name.len() {
                    self.name[self.name_len] = b.to_ascii_lowercase();
                }
                self.name_len += 1;
                At::Name
            }
            (At::Name, b':') => {
                self.headers += 1;
                if self.headers > self.max_headers {
                    return Err(Violation::TooManyHeaders);
                }
                self.framing_header()?;
                At::Value
            }
            (At::LineStart | At::Name, _) => {
                return Err(Malformed("a header line has no name, a character not allowed in a name, or no colon"))
            }
            (At::Value, b'\n') if self.in_content_length && !self.content_length_digits => {
                return Err(Malformed("Content-Length is not a number"))
            }
            (At::Value, b'\n') => {
                self.in_content_length = false;
                At::LineStart
            }
            (At::Value, b) if self.in_content_length => {
                // Digits, with optional white space around them.
                match b {
                    b'0'..=b'9' if !(self.content_length_digits && self.after_digits) => {
                        self.content_length_digits = true
                    }
                    b' ' | b'\t' => self.after_digits = self.content_length_digits,
                    _ => return Err(Malformed("Content-Length is not a number")),
                }
                At::Value
            }
            (At::Value, b) if is_value_byte(b) => At::Value,
            (At::Value, _) => return Err(Malformed("a header value contains a control character")),
        };
        Ok(false)
    }
}

impl HeadScanner {
    /// Content-Length twice, or with Transfer-Encoding, is how requests are smuggled past a
    /// proxy in front (RFC 9112 §6.1, §6.3 allow refusing both); no honest client sends them.
    fn framing_header(&mut self) -> Result<(), Violation> {
        let name = &self.name[..self.name_len.min(self.name.len())];
        if self.name_len == 14 && name == b"content-length" {
            if self.content_length {
                return Err(Violation::Malformed("the request has Content-Length twice"));
            }
            self.content_length = true;
            self.in_content_length = true;
        } else if self.name_len == 17 && name == b"transfer-encoding" {
            self.transfer_encoding = true;
        } else {
            return Ok(());
        }
        if self.content_length && self.transfer_encoding {
            return Err(Violation::Malformed("the request has both Content-Length and Transfer-Encoding"));
        }
        Ok(())
    }
}

/// Byte classes, as bits of [`CLASSES`].
const TCHAR: u8 = 1;
const VALUE: u8 = 2;
const TARGET: u8 = 4;

/// For each byte: RFC 9110 §5.6.2 token characters (method and header names), §5.5 field-value
/// bytes (visible characters, space, tab and obs-text), and request-target bytes (anything but
/// controls and space).
const CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let tchar = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            );
        let value = (c >= b' ' && c != 0x7f) || c == b'\t';
        let target = c > b' ' && c != 0x7f;
        t[b] = if tchar { TCHAR } else { 0 } | if value { VALUE } else { 0 } | if target { TARGET } else { 0 };
        b += 1;
    }
    t
};

fn is_tchar(b: u8) -> bool {
    CLASSES[usize::from(b)] & TCHAR != 0
}

fn is_value_byte(b: u8) -> bool {
    CLASSES[usize::from(b)] & VALUE != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(head: &[u8]) -> Scan {
        HeadScanner::new(1 << 10, 10).feed(head)
    }

    #[test]
    fn a_head_ends_at_the_blank_line_in_any_split() {
        let head = b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: k\r\n\r\n";
        let mut with_body = head.to_vec();
        with_body.extend_from_slice(b"{\"body\":\"\r\n\r\n\"}");
        for split in 0..=with_body.len() {
            let mut s = HeadScanner::new(1 << 10, 10);
            let end = match s.feed(&with_body[..split]) {
                Scan::Complete(n) => n,
                Scan::Incomplete => match s.feed(&with_body[split..]) {
                    Scan::Complete(n) => split + n,
                    other => panic!("split at {split}: {other:?}"),
                },
                other => panic!("split at {split}: {other:?}"),
            };
            assert_eq!(end, head.len(), "split at {split}");
        }
        // Bare LF line ends (which Pingora's parser accepts) and empty lines before the request
        // line (RFC 9112 §2.2).
        assert_eq!(scan(b"GET / HTTP/1.1\nHost: gw\n\n"), Scan::Complete(25));
        assert_eq!(scan(b"\r\nGET / HTTP/1.0\r\n\r\n"), Scan::Complete(20));
    }

    #[test]
    fn limits_name_what_was_too_big() {
        assert_eq!(HeadScanner::new(64, 10).feed(&[b'a'; 65]), Scan::Refused(Violation::UriTooLong));
        let mut long_header = b"GET / HTTP/1.1\r\nx: ".to_vec();
        long_header.extend([b'a'; 64]);
        assert_eq!(HeadScanner::new(64, 10).feed(&long_header), Scan::Refused(Violation::HeaderTooLarge));
        let many = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n";
        assert_eq!(HeadScanner::new(1 << 10, 2).feed(many), Scan::Refused(Violation::TooManyHeaders));
        assert_eq!(HeadScanner::new(1 << 10, 3).feed(many), Scan::Incomplete);
    }

    #[test]
    fn malformed_heads_say_what_is_wrong() {
        let cases: [(&[u8], &str); 10] = [
            (b"GARBAGE\r\n\r\n", "request line"),
            (b"GET\r\n\r\n", "request line"),
            (b"GET  / HTTP/1.1\r\n\r\n", "request line"),
            (b"GET / HTTP/2.0\r\n\r\n", "request line"),
            (b"GET /a\x01b HTTP/1.1\r\n\r\n", "request line"),
            (b"GET / HTTP/1.1\r\nX-Bad: a\x00b\r\n\r\n", "control character"),
            (b"GET / HTTP/1.1\r\nX-Bad: a\rb\r\n\r\n", "CR"),
            (b"GET / HTTP/1.1\r\nHost : gw\r\n\r\n", "no colon"),
            (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", "no colon"),
            (b"GET / HTTP/1.1\r\nHost: gw\r\n folded\r\n\r\n", "folding"),
        ];
        for (head, says) in cases {
            match scan(head) {
                Scan::Refused(Violation::Malformed(m)) => {
                    assert!(m.contains(says), "{:?}: {m}", String::from_utf8_lossy(head))
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(head)),
            }
        }
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
        ] {
            assert!(
                matches!(scan(head), Scan::Refused(Violation::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        assert!(matches!(
            scan(b"POST / HTTP/1.1\r\nContent-Length-X: 4\r\nContent-Length: 4\r\n\r\n"),
            Scan::Complete(_)
        ));
        for bad in ["abc", "", " ", "4 5", "-1", "0x10", "12a"] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(
                scan(head.as_bytes()),
                Scan::Refused(Violation::Malformed("Content-Length is not a number")),
                "{bad:?}"
            );
        }
        for good in ["0", "12", " 12 ", "\t7"] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length:{good}\r\nx: y\r\n\r\n");
            assert_eq!(scan(head.as_bytes()), Scan::Complete(head.len()), "{good:?}");
        }
        assert_eq!(scan(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"), Scan::Refused(Violation::Connect));
        assert_eq!(scan(b"CONNECTX / HTTP/1.1\r\n\r\n"), Scan::Complete(23));
        // What real clients send passes: UTF-8 in a value, tabs, every token character in a name.
        let fine = "POST /v1/messages?beta=true HTTP/1.1\r\nUser-Agent: claude-cli/2.1.0 (external, cli)\r\n\
                    X-Name: Zoë\tand more\r\nx-!#$%&'*+-.^_`|~: v\r\n\r\n";
        assert_eq!(scan(fine.as_bytes()), Scan::Complete(fine.len()));
    }
}
