"""A fault-injecting HTTP proxy for tests: 127.0.0.1 in front of the SeaweedFS S3 port.

`FaultProxy(upstream)` forwards every request byte for byte (the Host header too, so SigV4
signatures made for the proxy's address still verify) and answers with the server's
response, unless a `Rule` matches the request first:

  * `status=503, code="SlowDown"`      - answer with that S3 error instead of forwarding;
  * `reset_request_after=N`            - read N bytes of the request body, then reset the
                                         connection (TCP RST): a connection reset mid-upload;
  * `cut_response_after=N`             - forward, send the response headers and N bytes of
                                         the body, then close the connection (FIN, so the
                                         client gets those bytes): a download broken midway;
  * `respond=callable`                 - answer with what it returns, (status, headers,
                                         body), instead of forwarding (e.g. a server that
                                         ignores If-Match and serves another version);
  * `before=callable`                  - run it (e.g. replace the object) before forwarding.

A rule fires `times` times (None: always) after letting `skip` matching requests through.
Every request is recorded (`requests`, `count`), so a test can count server-side what
several processes downloaded. Bounded: at most `max_connections` client connections at once,
response bodies are held in memory (test objects are small), and the proxy stops by itself
after `lifetime` seconds if a test forgets to.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    """One request as the proxy saw it, and what it did with it."""

    method: str
    path: str  # /bucket/key, unquoted as sent
    query: dict[str, list[str]]
    headers: dict[str, str]
    fault: str | None = None  # the rule's name when one fired
    status: int | None = None  # the status sent to the client (None: reset before one)


@dataclass
class Rule:
    name: str
    method: str | None = None  # GET, PUT, POST, DELETE, HEAD; None: any
    path: str | None = None  # a regular expression searched in the path
    query_has: str | None = None  # a query parameter that must be present (e.g. partNumber)
    skip: int = 0  # matching requests let through before the rule fires
    times: int | None = 1  # how many times it fires; None: always
    status: int | None = None
    code: str = "SlowDown"
    reset_request_after: int | None = None
    cut_response_after: int | None = None
    respond: Callable[[Seen], tuple[int, dict[str, str], bytes]] | None = None
    before: Callable[[Seen], None] | None = None
    matched: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def matches(self, seen: Seen) -> bool:
        return ((self.method is None or seen.method == self.method)
                and (self.path is None or re.search(self.path, seen.path) is not None)
                and (self.query_has is None or self.query_has in seen.query))

    def take(self, seen: Seen) -> bool:
        """Whether the rule fires for this (matching) request; counts it."""
        if not self.matches(seen):
            return False
        self.matched += 1
        if self.matched <= self.skip or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, as from a crashed middlebox."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the S3 client expects
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests read `requests`
        pass

    def _handle(self) -> None:
        with self.server.proxy._busy:
            self.server.proxy._in_flight += 1
        try:
            self._handle_one()
        finally:
            with self.server.proxy._busy:
                self.server.proxy._in_flight -= 1
                self.server.proxy._busy.notify_all()

    def _handle_one(self) -> None:
        proxy = self.server.proxy
        parts = urlsplit(self.path)
        seen = Seen(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                    dict(self.headers.items()))
        rule = proxy._pick(seen)
        length = int(self.headers.get("Content-Length") or 0)
        if rule is not None and rule.reset_request_after is not None:
            self.rfile.read(min(length, rule.reset_request_after))
            proxy._record(seen, rule.name, None)
            self.close_connection = True
            _reset(self.connection)
            return
        body = self.rfile.read(length) if length else b""
        if rule is not None and rule.status is not None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                   f"<Message>injected by the test proxy</Message>"
                   f"<Resource>{parts.path}</Resource><RequestId>fault</RequestId>"
                   "</Error>").encode()
            self.send_response_only(rule.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            proxy._record(seen, rule.name, rule.status)
            self.wfile.write(xml)
            return
        if rule is not None and rule.before is not None:
            rule.before(seen)
        if rule is not None and rule.respond is not None:
            status, answer, data = rule.respond(seen)
            headers, declared = list(answer.items()), len(data)
        else:
            status, headers, data, declared = self._forward(body)
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        # Recorded once the status is out: a client may hang up before reading the body.
        proxy._record(seen, rule.name if rule is not None else None, status)
        if rule is not None and rule.cut_response_after is not None:
            self.wfile.write(data[:rule.cut_response_after])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes, int]:
        """Send the request upstream as it came (signed headers intact); the answer."""
        proxy = self.server.proxy
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                              timeout=proxy.upstream_timeout)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body if body else None)
            response = upstream.getresponse()
            data = response.read()
            headers = [(k, v) for k, v in response.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length")]
            declared = len(data)
            if self.command == "HEAD":
                declared = int(response.getheader("Content-Length") or 0)
            return response.status, headers, data, declared
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"

    def process_request(self, request, client_address):
        if not self.proxy._slots.acquire(timeout=10):
            _reset(request)  # bounded: refuse rather than pile up threads
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.proxy._slots.release()

    def handle_error(self, request, client_address):
        pass  # clients that we reset, or that hang up, are part of the test


class FaultProxy:
    """A proxy on a free 127.0.0.1 port; use as a context manager, or start()/stop()."""

    def __init__(self, upstream: str, *, lifetime: float = 300.0, max_connections: int = 32,
                 upstream_timeout: float = 30.0):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.upstream_timeout = upstream_timeout
        self.lifetime = lifetime
        self.rules: list[Rule] = []
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._busy = threading.Condition()
        self._in_flight = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.requests.clear()

    def _pick(self, seen: Seen) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.take(seen):
                    return rule
        return None

    def _record(self, seen: Seen, fault: str | None, status: int | None) -> None:
        seen.fault, seen.status = fault, status
        with self._lock:
            self.requests.append(seen)

    def count(self, method: str | None = None, path: str | None = None,
              query_has: str | None = None, fault: str | None = None) -> int:
        """Requests seen that match (None: anything)."""
        probe = Rule("count", method=method, path=path, query_has=query_has)
        with self._lock:
            return sum(1 for s in self.requests
                       if probe.matches(s) and (fault is None or s.fault == fault))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request is being handled (so `requests` holds every answered one)."""
        with self._busy:
            if not self._busy.wait_for(lambda: self._in_flight == 0, timeout):
                raise TimeoutError(f"proxy still busy after {timeout} s")

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)  # stops by itself
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None and self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
