"""An HTTP proxy in front of the S3 endpoint that misbehaves like a busy object store.

Seeded: a fraction of requests is answered `503 SlowDown` or has its connection reset; with
`cut_rate`, a fraction of successful GETs is cut off halfway through the body. Keys matching a
deny pattern are always `403 AccessDenied`. Everything else is forwarded unchanged.
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "content-length"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                 b'<Message>Access Denied</Message></Error>')


class FaultyS3Proxy:
    def __init__(self, upstream: str, seed: int = 0, fault_rate: float = 0.0,
                 deny: str | None = None, cut_rate: float = 0.0):
        self.upstream = urlparse(upstream)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.fault_rate = fault_rate
        self.cut_rate = cut_rate
        self.deny = re.compile(deny) if deny else None
        self.counts = {"forwarded": 0, "slow_down": 0, "reset": 0, "denied": 0, "cut": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    roll = proxy.rng.random()
                if proxy.deny and proxy.deny.search(self.path):
                    proxy._count("denied")
                    return self._reply(403, ACCESS_DENIED)
                if roll < proxy.fault_rate / 2:
                    proxy._count("slow_down")
                    return self._reply(503, SLOW_DOWN)
                if roll < proxy.fault_rate:
                    proxy._count("reset")
                    return self._reset()
                proxy._count("forwarded")
                upstream = http.client.HTTPConnection(proxy.upstream.hostname,
                                                      proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                length = response.getheader("Content-Length")
                self.send_header("Content-Length",
                                 length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                upstream.close()
                if self.command == "GET" and len(data) > 1 and response.status < 300 \
                        and roll < proxy.fault_rate + proxy.cut_rate:
                    proxy._count("cut")
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    return self._reset()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _reset(self):
                # an RST instead of an orderly close: the client sees "connection reset"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _count(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
