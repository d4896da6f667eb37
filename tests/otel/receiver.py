#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace receiver for tests/otel.rs: the collector the gateway exports to.

    receiver.py --port-file PATH --out PATH

Listens on 127.0.0.1 on a port of the kernel's choosing and writes that port to --port-file once
it listens (written whole, then renamed into place, so a reader never sees half a number). Each
POST /v1/traces with `content-type: application/x-protobuf` is decoded as opentelemetry-proto's
ExportTraceServiceRequest, and every span in it becomes one JSON line in --out:

    {"trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex>" or null,
     "name": ..., "kind": 2, "start_time_unix_nano": ..., "end_time_unix_nano": ...,
     "status_code": 0, "status_message": "", "attributes": {...}, "resource": {...},
     "scope": "tollgate", "scope_version": "..."}

Attribute values are decoded to the Python value (string, bool, int, float; arrays and key-value
lists too), so a test compares them with the audit record's values exactly. The answer is 200
with an empty ExportTraceServiceResponse.

It decodes strictly, because a lenient decoder would hide the encoder bugs the test is there to
find: a body that does not parse, or parses only with fields this proto does not know (a wrong
field number in a hand-written encoder lands there), ids of the wrong length, or an attribute key
twice on one span is refused with 400. Every refusal (a wrong path is 404, a wrong content type
415) is logged to stderr and written to --out as `{"rejected": "<why>", "status": N}`, so the test
fails with the reason rather than waiting for spans that never come. Each write is flushed.
"""

import argparse
import gzip
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"


class Rejected(Exception):
    """A request refused with `status`; the message says why."""

    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


def any_value(v):
    """An AnyValue as the Python value it holds (None when it holds none)."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values, "a kvlist")
    if kind == "bytes_value":
        return v.bytes_value.hex()
    # string_value, bool_value, int_value (int64), double_value.
    return getattr(v, kind)


def attributes(key_values, where):
    """KeyValues as a dict; a key twice is refused (OTLP requires them unique)."""
    out = {}
    for kv in key_values:
        if kv.key in out:
            raise Rejected(400, f"attribute {kv.key!r} twice in {where}")
        out[kv.key] = any_value(kv.value)
    return out


def unknown_fields(message, path="ExportTraceServiceRequest"):
    """The path of the first field anywhere in `message` that its proto does not define."""
    if unknown_field_set(message):
        return path
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        # A repeated field is a container of messages, a singular one the message itself.
        children = [value] if isinstance(value, Message) else value
        for i, child in enumerate(children):
            found = unknown_fields(child, f"{path}.{field.name}[{i}]")
            if found:
                return found
    return None


def unknown_field_set(message):
    # protobuf 4.22+ moved unknown fields out of the message class; older ones keep them on it.
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # pragma: no cover - older protobuf
        return len(message.UnknownFields())
    return len(UnknownFieldSet(message))


def hex_id(raw, size, what, optional=False):
    if optional and not raw:
        return None
    if len(raw) != size:
        raise Rejected(400, f"{what} is {len(raw)} bytes, not {size}")
    return raw.hex()


def spans_of(body):
    """One dict per span in an ExportTraceServiceRequest body."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as e:
        raise Rejected(400, f"not an ExportTraceServiceRequest: {e}") from None
    where = unknown_fields(request)
    if where:
        raise Rejected(400, f"fields unknown to opentelemetry-proto in {where}")
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes, "the resource")
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "trace_id": hex_id(s.trace_id, 16, "trace_id"),
                        "span_id": hex_id(s.span_id, 8, "span_id"),
                        "parent_span_id": hex_id(s.parent_span_id, 8, "parent_span_id", optional=True),
                        "name": s.name,
                        "kind": s.kind,
                        "start_time_unix_nano": s.start_time_unix_nano,
                        "end_time_unix_nano": s.end_time_unix_nano,
                        "status_code": s.status.code,
                        "status_message": s.status.message,
                        "attributes": attributes(s.attributes, f"span {s.name!r}"),
                        "resource": resource,
                        "scope": ss.scope.name,
                        "scope_version": ss.scope.version,
                    }
                )
    return out


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as collectors do: the exporter may reuse its connection.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        try:
            body = self.read_body()
            if urlsplit(self.path).path != TRACES_PATH:
                raise Rejected(404, f"POST {self.path}: only {TRACES_PATH} is served")
            content_type = self.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != PROTOBUF:
                raise Rejected(415, f"content-type {content_type!r}, not {PROTOBUF}")
            encoding = self.headers.get("content-encoding", "identity").strip().lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding != "identity":
                raise Rejected(415, f"content-encoding {encoding!r}")
            spans = spans_of(body)
        except Rejected as e:
            self.refuse(e.status, str(e))
            return
        self.server.write([json.dumps(s, sort_keys=True) for s in spans])
        self.answer(200, PROTOBUF, ExportTraceServiceResponse().SerializeToString())

    def do_GET(self):
        self.refuse(404, f"{self.command} {self.path}: only POST {TRACES_PATH} is served")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def read_body(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    # Trailers, up to the blank line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length", 0)))

    def refuse(self, status, why):
        sys.stderr.write(f"otel-receiver: {status} {why}\n")
        self.server.write([json.dumps({"rejected": why, "status": status})])
        self.answer(status, "text/plain", why.encode())

    def answer(self, status, content_type, body):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):
        # Accepted exports are not worth a line each; refusals are logged by `refuse`.
        pass


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, out):
        super().__init__(("127.0.0.1", 0), Handler)
        self.out = open(out, "a", encoding="utf-8")
        # One export's lines stay together, whichever connection they came on.
        self.lock = threading.Lock()

    def write(self, lines):
        with self.lock:
            for line in lines:
                self.out.write(line + "\n")
            self.out.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True, help="where to write the port once listening")
    parser.add_argument("--out", required=True, help="the JSON-lines file spans are appended to")
    args = parser.parse_args()
    server = Receiver(args.out)
    # The constructor bound and listened: the port is live before anyone can read it.
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
