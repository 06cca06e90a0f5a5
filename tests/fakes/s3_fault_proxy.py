#!/usr/bin/env python3
"""A loopback HTTP proxy in front of an S3 server that injects the failures S3 clients must
survive: 500/503 answers, SlowDown, connection resets before or in the middle of a body,
truncated bodies (fewer bytes than Content-Length), stalls and latency.

Usage: s3_fault_proxy.py --port-file FILE --upstream 127.0.0.1:PORT
It listens on 127.0.0.1 (an ephemeral port, written to FILE once listening) and forwards every
request unchanged (Host header included, so SigV4 signatures still verify upstream).

Control (not forwarded): POST /__mq_fault with a JSON list of faults appends to the plan;
DELETE /__mq_fault clears it; GET /__mq_fault returns {"requests": n, "applied": {...}, "plan": [...]}.
A fault is {"match": "PUT /bucket/key", "kind": KIND, "count": N, "status": 503, "delay_ms": 300}:
the first `count` requests whose "METHOD /path?query" contains `match` get it. Kinds:
  status          answer `status` (default 500) with an InternalError body, do not forward
  error           answer `status` with S3 error `code`, `message` (and `region`), do not forward
  slowdown        answer 503 SlowDown, do not forward
  reset           read the request, then reset the connection without answering
  reset_mid_body  forward, send the headers and half the body, then reset
  truncate        forward, send the headers and half the body, then close cleanly
  stall           forward, send the headers and half the body, then hang for delay_ms
  latency         wait delay_ms, then forward normally
"""
import argparse
import http.client
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
PLAN = []
STATS = {"requests": 0, "applied": {}}
UPSTREAM = ("127.0.0.1", 0)


def take_fault(line):
    with LOCK:
        STATS["requests"] += 1
        for f in PLAN:
            if f.get("count", 1) > 0 and f.get("match", "") in line:
                f["count"] = f.get("count", 1) - 1
                STATS["applied"][f["kind"]] = STATS["applied"].get(f["kind"], 0) + 1
                return dict(f)
    return None


def error_xml(code, message, region=None):
    extra = "<Region>%s</Region>" % region if region else ""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message>'
            '%s</Error>' % (code, message, extra)).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reset(self):
        # SO_LINGER 0: close() sends RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def control(self):
        global PLAN
        data = self.body()
        if self.command == "POST":
            with LOCK:
                PLAN.extend(json.loads(data or b"[]"))
        elif self.command == "DELETE":
            with LOCK:
                PLAN = []
                STATS["requests"] = 0
                STATS["applied"] = {}
        with LOCK:
            out = json.dumps({"requests": STATS["requests"], "applied": STATS["applied"],
                              "plan": PLAN}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def handle_any(self):
        if self.path.startswith("/__mq_fault"):
            return self.control()
        body = self.body()
        fault = take_fault("%s %s" % (self.command, self.path))
        kind = fault["kind"] if fault else None
        if kind in ("status", "slowdown", "error"):
            status = 503 if kind == "slowdown" else int(fault.get("status", 500))
            code = "SlowDown" if kind == "slowdown" else (
                "ServiceUnavailable" if status == 503 else "InternalError")
            code = fault.get("code", code)
            out = error_xml(code, fault.get("message", "injected by s3_fault_proxy"),
                            fault.get("region"))
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)
            return
        if kind == "reset":
            return self.reset()
        if kind == "latency":
            time.sleep(fault.get("delay_ms", 200) / 1000.0)
        conn = http.client.HTTPConnection(*UPSTREAM, timeout=60)
        headers = {k: v for k, v in self.headers.items()}
        conn.request(self.command, self.path, body=body if body else None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() in ("transfer-encoding", "connection", "content-length"):
                continue
            self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind in ("reset_mid_body", "truncate", "stall") and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if kind == "stall":
                time.sleep(fault.get("delay_ms", 5000) / 1000.0)
            if kind == "reset_mid_body":
                return self.reset()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


def main():
    global UPSTREAM
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server")
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    UPSTREAM = (host, int(port))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.rename(tmp, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
