//! Spans as OTLP protobuf: `ExportTraceServiceRequest` of opentelemetry-proto's
//! `collector/trace/v1`, encoded by hand. The few messages a gateway sends do not need a
//! protobuf code generator; the field numbers below are the proto files' own.

/// An attribute's value: the `AnyValue` kinds a span here uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Bool(bool),
    Int(i64),
    Double(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server = 2,
    Client = 3,
}

#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Status.code` ERROR (2), with this message; UNSET otherwise.
    pub error: Option<String>,
}

/// One export: every span under the gateway's resource and the `tollgate` scope.
pub fn encode_request(resource: &[(&'static str, Value)], spans: &[Span]) -> Vec<u8> {
    let mut resource_spans = Vec::with_capacity(256 * spans.len() + 128);
    // ResourceSpans.resource = 1: Resource.attributes = 1.
    message(&mut resource_spans, 1, |r| {
        for (k, v) in resource {
            message(r, 1, |kv| key_value(kv, k, v));
        }
    });
    // ResourceSpans.scope_spans = 2: ScopeSpans.scope = 1 (name = 1, version = 2), spans = 2.
    message(&mut resource_spans, 2, |scope_spans| {
        message(scope_spans, 1, |scope| {
            string(scope, 1, "tollgate");
            string(scope, 2, env!("CARGO_PKG_VERSION"));
        });
        for span in spans {
            message(scope_spans, 2, |s| encode_span(s, span));
        }
    });
    // ExportTraceServiceRequest.resource_spans = 1.
    let mut out = Vec::with_capacity(resource_spans.len() + 8);
    length_delimited(&mut out, 1, &resource_spans);
    out
}

fn encode_span(out: &mut Vec<u8>, s: &Span) {
    length_delimited(out, 1, &s.trace_id);
    length_delimited(out, 2, &s.span_id);
    if let Some(parent) = &s.parent_span_id {
        length_delimited(out, 4, parent);
    }
    string(out, 5, &s.name);
    varint_field(out, 6, s.kind as u64);
    fixed64(out, 7, s.start_unix_nanos);
    fixed64(out, 8, s.end_unix_nanos);
    for (k, v) in &s.attributes {
        message(out, 9, |kv| key_value(kv, k, v));
    }
    // Status = 15: message = 2, code = 3.
    if let Some(why) = &s.error {
        message(out, 15, |st| {
            string(st, 2, why);
            varint_field(st, 3, 2);
        });
    }
}

/// KeyValue: key = 1, value = 2 (AnyValue: string 1, bool 2, int64 3, double 4).
fn key_value(out: &mut Vec<u8>, k: &str, v: &Value) {
    string(out, 1, k);
    message(out, 2, |any| match v {
        Value::Str(s) => string(any, 1, s),
        Value::Bool(b) => varint_field(any, 2, *b as u64),
        Value::Int(i) => varint_field(any, 3, *i as u64),
        Value::Double(d) => fixed64(any, 4, d.to_bits()),
    });
}

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, field << 3 | wire);
}

fn varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    tag(out, field, VARINT);
    varint(out, v);
}

fn fixed64(out: &mut Vec<u8>, field: u64, v: u64) {
    tag(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

fn length_delimited(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    tag(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn string(out: &mut Vec<u8>, field: u64, s: &str) {
    length_delimited(out, field, s.as_bytes());
}

/// A nested message: written to a scratch buffer first, its length then known.
fn message(out: &mut Vec<u8>, field: u64, write: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    write(&mut inner);
    length_delimited(out, field, &inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        out.clear();
        varint(&mut out, u64::MAX);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn a_span_encodes_to_the_proto_fields() {
        let span = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            name: "chat m".into(),
            kind: Kind::Server,
            start_unix_nanos: 5,
            end_unix_nanos: 6,
            attributes: vec![("a", Value::Int(-1))],
            error: None,
        };
        let mut out = Vec::new();
        encode_span(&mut out, &span);
        // trace_id: field 1, length 16.
        assert_eq!(&out[..2], &[0x0a, 16]);
        // span_id: field 2, length 8, right after.
        assert_eq!(&out[18..20], &[0x12, 8]);
        // name: field 5.
        assert_eq!(&out[28..30], &[0x2a, 6]);
        // A negative int64 is ten bytes of varint, as protobuf encodes it.
        let kv_start = out.iter().position(|&b| b == 0x4a).unwrap();
        assert_eq!(out[kv_start + 1] as usize, out.len() - kv_start - 2);
    }
}
