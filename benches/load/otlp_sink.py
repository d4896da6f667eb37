"""An OTLP/HTTP collector stand-in for the load benchmark: takes every POST to /v1/traces,
reads it whole, answers 200 and counts bytes and batches (printed on SIGINT). It decodes
nothing: the benchmark measures what tracing costs the gateway, not a collector."""

import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

batches = 0
received = 0


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global batches, received
        n = int(self.headers.get("content-length", "0"))
        received += len(self.rfile.read(n))
        batches += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)

    def done(*_):
        print(f"otlp sink: {batches} batches, {received} bytes", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGINT, done)
    server.serve_forever()


if __name__ == "__main__":
    main()
