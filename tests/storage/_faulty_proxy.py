"""A fault-injecting HTTP/1.1 proxy on loopback, in front of a real S3 endpoint.

Tests point an ``S3Store`` at :attr:`FaultyProxy.endpoint` instead of the
server. The proxy parses every request (keep-alive connections carry several;
bodies come by ``Content-Length`` or chunked ``Transfer-Encoding``, and an
``Expect: 100-continue`` is answered by the proxy itself), then, for a seeded
random fraction of the requests that match, injects one :class:`Fault`;
every other request is forwarded to the upstream and its answer relayed
faithfully (status, headers, the whole body). The ``Host`` header is passed
through untouched, so SigV4 signatures made for the proxy's address still
verify upstream.

Everything it does is bounded: loopback only, a cap on connections, on
requests per connection, on header lines and on body sizes, socket timeouts
everywhere, and :meth:`FaultyProxy.close` stops every thread it started.
"""

from __future__ import annotations

import enum
import http.client
import random
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO
from urllib.parse import urlsplit

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "expect", "content-length",
})
_MAX_LINE_BYTES = 64 << 10
_MAX_HEADERS = 200
_MAX_BODY_BYTES = 256 << 20
_MAX_REQUESTS_PER_CONNECTION = 10_000
_MAX_CHUNKS = 1 << 20
_MAX_BLANK_LINES = 8
_MAX_LOG = 100_000


class Fault(enum.Enum):
    """What the proxy can do to a request instead of relaying it faithfully."""

    SLOW_DOWN = "slow_down"
    """Answer ``503 SlowDown`` with an S3 XML error body; the upstream never sees the request."""
    DROP = "drop"
    """Close the connection without answering; the upstream never sees the request."""
    CUT_BODY = "cut_body"
    """Forward, relay the status and headers, send half the body, close (only for GETs)."""
    LOST_RESPONSE = "lost_response"
    """Forward (the upstream carries the request out), then close without answering."""
    ACCESS_DENIED = "access_denied"
    """Answer ``403 AccessDenied`` (an error no client should retry); the upstream never sees it."""


_ERROR_ANSWERS: dict[Fault, tuple[int, str, str, str]] = {
    Fault.SLOW_DOWN: (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    Fault.ACCESS_DENIED: (403, "Forbidden", "AccessDenied", "Access Denied"),
}


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed client request, as the proxy saw it."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    chunked: bool

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    @property
    def query(self) -> str:
        """The query string of the target ("" when there is none)."""
        return urlsplit(self.target).query


@dataclass(frozen=True, slots=True)
class Seen:
    """What happened to one request: its method, target, body size, and the fault injected (None: relayed)."""

    method: str
    target: str
    body_bytes: int
    chunked: bool
    fault: Fault | None


class _Closed(Exception):
    """The client closed its connection, or sent something the proxy refuses to parse."""


class FaultyProxy:
    """A threaded HTTP/1.1 proxy on a free 127.0.0.1 port that injects faults into a share of requests.

    The n-th request that matches (in arrival order) gets the n-th draw of a
    ``random.Random(seed)``: with probability ``fault_rate`` it gets a fault,
    chosen uniformly among the configured ``faults`` that apply to it
    (``CUT_BODY`` applies only to GETs). So the sequence of faults is
    reproducible, though under concurrency which request receives which draw
    is not. ``injected`` counts the faults actually injected, per kind; a
    ``CUT_BODY`` drawn for an answer with fewer than 2 body bytes is relayed
    intact and not counted.

    Use it as a context manager, or call :meth:`close`: that stops accepting,
    closes every open client socket and joins every thread it started.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fault_rate: float = 0.0,
        faults: Iterable[Fault] = (Fault.SLOW_DOWN, Fault.DROP, Fault.CUT_BODY),
        seed: int = 0,
        match: Callable[[Request], bool] | None = None,
        max_connections: int = 64,
        timeout_s: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in _LOOPBACK or parts.port is None:
            raise ValueError(f"FaultyProxy: upstream {upstream!r} must be http://<loopback>:<port>")
        self._upstream = (parts.hostname, parts.port)
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._fault_rate = 0.0
        self._faults: tuple[Fault, ...] = ()
        self._match: Callable[[Request], bool] | None = None
        self.configure(fault_rate=fault_rate, faults=faults, match=match)
        self.injected: Counter[Fault] = Counter()
        self.seen: deque[Seen] = deque(maxlen=_MAX_LOG)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._clients: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="faulty-proxy-accept", daemon=True)
        self._acceptor.start()

    # -- control -------------------------------------------------------------------

    def configure(
        self,
        *,
        fault_rate: float | None = None,
        faults: Iterable[Fault] | None = None,
        match: Callable[[Request], bool] | None = None,
    ) -> None:
        """Change the fault rate, the fault kinds or the request filter; takes effect at the next request.

        ``match`` of None leaves the filter as it is; pass ``lambda r: True`` to clear it.
        """
        with self._lock:
            if fault_rate is not None:
                if not 0.0 <= fault_rate <= 1.0:
                    raise ValueError(f"FaultyProxy: fault_rate={fault_rate} must be within [0, 1]")
                self._fault_rate = fault_rate
            if faults is not None:
                chosen = tuple(dict.fromkeys(faults))
                if not chosen:
                    raise ValueError("FaultyProxy: give at least one fault kind")
                self._faults = chosen
            if match is not None:
                self._match = match

    @property
    def total_injected(self) -> int:
        """How many faults of any kind were injected so far."""
        with self._lock:
            return sum(self.injected.values())

    def requests(self, method: str | None = None, query_contains: str = "") -> list[Seen]:
        """The requests seen so far, optionally only one method's and those whose target contains a string."""
        with self._lock:
            seen = list(self.seen)
        return [s for s in seen if (method is None or s.method == method) and query_contains in s.target]

    def close(self) -> None:
        """Stop accepting, close every client connection, and join every thread the proxy started."""
        self._stop.set()
        self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
            threads = list(self._threads)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=self._timeout_s)
        alive = [t.name for t in threads if t.is_alive()]
        if alive or self._acceptor.is_alive():
            raise RuntimeError(f"FaultyProxy: threads still running after close: {alive}")

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- connections -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=0.1):
                continue
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, OSError):
                self._slots.release()
                continue
            sock.settimeout(self._timeout_s)
            thread = threading.Thread(target=self._serve, args=(sock,), name="faulty-proxy-conn", daemon=True)
            with self._lock:
                self._clients.add(sock)
                self._threads.add(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            reader = sock.makefile("rb")
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                if self._stop.is_set():
                    return
                request = _read_request(reader, sock)
                if request is None or not self._handle(sock, request):
                    return
        except (_Closed, OSError, http.client.HTTPException):
            return
        finally:
            with self._lock:
                self._clients.discard(sock)
                self._threads.discard(threading.current_thread())
            sock.close()
            self._slots.release()

    def _draw(self, request: Request) -> Fault | None:
        """The fault for this request, from the next draw of the seeded sequence (None: relay it)."""
        with self._lock:
            if self._match is not None and not self._match(request):
                return None
            if self._rng.random() >= self._fault_rate:
                return None
            kinds = [f for f in self._faults if f is not Fault.CUT_BODY or request.method == "GET"]
            return self._rng.choice(kinds) if kinds else None

    def _record(self, request: Request, fault: Fault | None) -> None:
        with self._lock:
            if fault is not None:
                self.injected[fault] += 1
            self.seen.append(Seen(request.method, request.target, len(request.body), request.chunked, fault))

    def _handle(self, sock: socket.socket, request: Request) -> bool:
        """Answer one request (faithfully or not); whether the connection stays open."""
        fault = self._draw(request)
        if fault is Fault.DROP:
            self._record(request, fault)
            return False
        answer = _ERROR_ANSWERS.get(fault) if fault is not None else None
        if answer is not None:
            self._record(request, fault)
            _send_error(sock, request, *answer)
            return True
        status, reason, headers, body = self._forward(request)
        if fault is Fault.LOST_RESPONSE:
            self._record(request, fault)
            return False
        no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        if fault is Fault.CUT_BODY and (no_body or len(body) < 2):
            fault = None
        self._record(request, fault)
        head = [f"HTTP/1.1 {status} {reason}"]
        head += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP]
        if request.method == "HEAD":
            length = next((v for k, v in headers if k.lower() == "content-length"), None)
            if length is not None:
                head.append(f"Content-Length: {length}")
        elif not no_body:
            head.append(f"Content-Length: {len(body)}")
        keep_alive = fault is None and _keeps_alive(request)
        if not keep_alive:
            head.append("Connection: close")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if no_body:
            return keep_alive
        if fault is Fault.CUT_BODY:
            sock.sendall(body[: len(body) // 2])
            return False
        sock.sendall(body)
        return keep_alive

    def _forward(self, request: Request) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send ``request`` to the upstream on a fresh connection; its status, reason, headers and whole body."""
        conn = http.client.HTTPConnection(*self._upstream, timeout=self._timeout_s)
        try:
            conn.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers:
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if request.body or request.header("content-length") is not None or request.chunked:
                conn.putheader("Content-Length", str(len(request.body)))
            conn.endheaders(request.body or None)
            response = conn.getresponse()
            body = response.read()
            return response.status, response.reason, list(response.msg.items()), body
        finally:
            conn.close()


def _keeps_alive(request: Request) -> bool:
    connection = (request.header("connection") or "").lower()
    return "close" not in connection


def _send_error(sock: socket.socket, request: Request, status: int, reason: str, code: str, message: str) -> None:
    """Answer with an S3-style XML error, as a real endpoint would (no body for HEAD)."""
    resource = urlsplit(request.target).path
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>faulty-proxy</RequestId></Error>"
    ).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/xml", "x-amz-request-id: faulty-proxy"]
    head.append(f"Content-Length: {len(body)}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if request.method != "HEAD":
        sock.sendall(body)


def _readline(reader: BinaryIO) -> bytes:
    line = reader.readline(_MAX_LINE_BYTES + 1)
    if len(line) > _MAX_LINE_BYTES:
        raise _Closed("line too long")
    return line


def _read_request(reader: BinaryIO, sock: socket.socket) -> Request | None:
    """Parse the next request off a client connection; None when the client closed it cleanly."""
    line = _readline(reader)
    for _ in range(_MAX_BLANK_LINES):  # a few blank lines are tolerated between requests (RFC 9112 2.2)
        if line not in (b"\r\n", b"\n"):
            break
        line = _readline(reader)
    if not line:
        return None
    try:
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ")
    except ValueError:
        raise _Closed(f"bad request line {line[:80]!r}") from None
    if not version.startswith("HTTP/1."):
        raise _Closed(f"unsupported version {version!r}")
    headers: list[tuple[str, str]] = []
    for _ in range(_MAX_HEADERS + 1):
        raw = _readline(reader)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise _Closed(f"bad header line {raw[:80]!r}")
        headers.append((name.strip(), value.strip()))
    else:
        raise _Closed("too many headers")
    fields = {k.lower(): v for k, v in headers}
    if fields.get("expect", "").lower() == "100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    chunked = "chunked" in fields.get("transfer-encoding", "").lower()
    if chunked:
        body = _read_chunked(reader)
    else:
        length = int(fields.get("content-length", "0"))
        if not 0 <= length <= _MAX_BODY_BYTES:
            raise _Closed(f"body of {length} bytes refused")
        body = reader.read(length)
        if len(body) != length:
            raise _Closed("client closed midway through a body")
    return Request(method, target, tuple(headers), body, chunked)


def _read_chunked(reader: BinaryIO) -> bytes:
    """The decoded body of a chunked request (trailers are read and dropped)."""
    parts: list[bytes] = []
    total = 0
    for _ in range(_MAX_CHUNKS):
        size_line = _readline(reader)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _Closed(f"bad chunk size {size_line[:80]!r}") from None
        if size == 0:
            break
        total += size
        if total > _MAX_BODY_BYTES:
            raise _Closed("chunked body too large")
        chunk = reader.read(size)
        if len(chunk) != size or _readline(reader) not in (b"\r\n", b"\n"):
            raise _Closed("client closed midway through a chunk")
        parts.append(chunk)
    else:
        raise _Closed("too many chunks")
    for _ in range(_MAX_HEADERS + 1):
        if _readline(reader) in (b"\r\n", b"\n", b""):
            break
    return b"".join(parts)
