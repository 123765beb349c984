"""The webhook sender's HTTP client: POSTs over kept-alive HTTP/1.1 connections.

A small HTTP/1.1 client on plain sockets (TLS by the ``ssl`` module) with a pool of idle
connections per origin (scheme, host, port), so a receiver gets its webhooks over a few
reused connections instead of a handshake each. A sending thread takes a connection for
one request and puts it back once the answer is read whole. An idle connection is not
reused once the receiver has closed it (or sent anything unasked), nor after
``IDLE_EXPIRY_S`` idle, httpx's default; there is no silent resend of a POST: a failed
request is a failed attempt, retried (or not) by the deliverer.

What is sent is what ``http.client`` sent (Host, ``Accept-Encoding: identity``,
Content-Length, then the given headers), in one write. The answer is framed per RFC 9112
(Content-Length, chunked, or up to the close; none for 204/304; interim 1xx skipped) and
its body thrown away; only the status matters. Why not ``http.client``: it parses every
answer's headers with the ``email`` package, a file object per answer, and costs about
4x the CPU per webhook of this; httpx costs more still (its client, transport and pool
layers), and h11 no less. No proxy from the environment is used (a local receiver must
not go through HTTP(S)_PROXY), and redirects are not followed (a 3xx answer is a failed
attempt). A malformed answer raises ``http.client.HTTPException``, as before.
"""

from __future__ import annotations

import base64
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from http.client import (
    BadStatusLine,
    HTTPException,
    IncompleteRead,
    InvalidURL,
    LineTooLong,
    RemoteDisconnected,
)
from urllib.parse import unquote, urlsplit

IDLE_EXPIRY_S = 5.0  # an idle connection older than this is closed, not reused (httpx's)
MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and headers (http.client: 64 KiB a line)
MAX_HEADERS = 100  # as http.client
RECV_BYTES = 64 * 1024

_Origin = tuple[str, str, int]
# What http.client refuses in a request target: control characters and spaces.
_BAD_TARGET = re.compile("[\x00-\x20\x7f]")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: .*)?")


class _Conn:
    """One connection: its socket and the bytes read past the last answer (none, normally)."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def recv(self) -> bytes:
        data = self.sock.recv(RECV_BYTES)
        if not data:
            raise IncompleteRead(b"")  # the peer closed the connection mid-answer
        return data


class WebhookClient:
    """Thread-safe POSTs to http(s) URLs, each answer read whole; returns the status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[_Origin, list[tuple[float, _Conn]]] = {}
        self._closed = False
        self._tls: ssl.SSLContext | None = None  # made on the first https receiver

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
        """POST ``body`` to ``url``; the answer's status code. Raises OSError (timeouts
        and refused connections included), http.client.HTTPException, or ValueError for a
        URL it cannot send to."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        if scheme not in {"http", "https"} or not host:
            raise ValueError(f"not an absolute http(s) URL: {url!r}")
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if _BAD_TARGET.search(target):
            raise InvalidURL(f"URL can't contain control characters. {target!r}")
        if parts.username is not None:  # user:password@ in the URL: basic auth, as httpx does
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            token = base64.b64encode(pair.encode("utf-8")).decode("ascii")
            headers = {**headers, "authorization": f"Basic {token}"}
        # As http.client: an ASCII request line (UnicodeEncodeError, a ValueError, if not),
        # then Host, Accept-Encoding and Content-Length before the given headers (Latin-1).
        lines = [
            f"Host: {_host_header(host, port, default_port)}",
            "Accept-Encoding: identity",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
            "\r\n",
        ]
        request = (
            f"POST {target} HTTP/1.1\r\n".encode("ascii")
            + "\r\n".join(lines).encode("latin-1")
            + body
        )
        origin = (scheme, host, port)
        conn = self._checkout(origin, timeout_s)
        try:
            conn.sock.sendall(request)
            status, reusable = _read_answer(conn)
        except BaseException:
            conn.close()
            raise
        if reusable and not conn.buf:
            self._checkin(origin, conn)
        else:
            conn.close()  # the receiver closes it, or sent more than the one answer
        return status

    def close(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for pool in idle.values():
            for _, conn in pool:
                conn.close()

    def _checkout(self, origin: _Origin, timeout_s: float) -> _Conn:
        now = time.monotonic()
        while True:
            with self._lock:
                pool = self._idle.get(origin)
                if not pool:
                    break
                since, conn = pool.pop()  # the most recently used: the likeliest alive
            if now - since <= IDLE_EXPIRY_S and _usable(conn.sock):
                if conn.sock.gettimeout() != timeout_s:
                    # Only on a change: settimeout is a system call that releases the GIL.
                    conn.sock.settimeout(timeout_s)
                return conn
            conn.close()
        scheme, host, port = origin
        sock = socket.create_connection((host, port), timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as http.client
            if scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                sock = self._tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def _checkin(self, origin: _Origin, conn: _Conn) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(origin, []).append((time.monotonic(), conn))
                return
        conn.close()


def _host_header(host: str, port: int, default_port: int) -> str:
    # http.client's Host: IDNA for a non-ASCII name, brackets for IPv6, the port if not
    # the scheme's.
    try:
        name = host.encode("ascii").decode("ascii")
    except UnicodeEncodeError:
        name = host.encode("idna").decode("ascii")
    if ":" in host:
        name = f"[{name}]"
    return name if port == default_port else f"{name}:{port}"


def _read_answer(conn: _Conn) -> tuple[int, bool]:
    """Read one answer whole (interim 1xx answers skipped); (status, connection reusable)."""
    while True:
        status, version, fields = _read_head(conn)
        if not 100 <= status < 200 or status == 101:
            break
    connection = fields.get("connection", "").lower()
    if version == 1:
        keep_alive = "close" not in connection
    else:  # HTTP/1.0 keeps a connection only when it says so
        keep_alive = "keep-alive" in connection or "keep-alive" in fields
    if status < 200 or status in {204, 304}:
        return status, keep_alive and status != 101
    coding = fields.get("transfer-encoding")
    if coding is not None:
        if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
            _read_to_close(conn)
            return status, False
        _read_chunked(conn)
        return status, keep_alive
    length = fields.get("content-length")
    if length is None:
        _read_to_close(conn)  # the body runs up to the close
        return status, False
    values = {value.strip() for value in length.split(",")}
    if len(values) != 1 or not ((size := values.pop()).isascii() and size.isdigit()):
        raise HTTPException(f"invalid Content-Length: {length!r}")
    _skip(conn, int(size))
    return status, keep_alive


def _read_head(conn: _Conn) -> tuple[int, int, dict[str, str]]:
    """Status line and headers: (status, minor version, lower-cased name -> value; repeated
    headers joined with commas)."""
    buf = conn.buf
    while True:
        ends = [i for i in (buf.find(b"\n\r\n"), buf.find(b"\n\n")) if i >= 0]
        if ends:
            end = min(ends)
            break
        if len(buf) > MAX_HEAD_BYTES:
            raise LineTooLong("header line")
        data = conn.sock.recv(RECV_BYTES)
        if not data:
            if buf:
                raise IncompleteRead(buf)
            raise RemoteDisconnected("Remote end closed connection without response")
        buf += data
    # The head ends with an empty line: "\n\r\n" or "\n\n" from where it was found.
    head, conn.buf = buf[:end], buf[end + (3 if buf[end + 1 : end + 2] == b"\r" else 2) :]
    lines = head.split(b"\n")
    match = _STATUS_LINE.fullmatch(lines[0].rstrip(b"\r"))
    if match is None or int(match.group(2)) < 100:
        raise BadStatusLine(repr(lines[0]))
    if len(lines) > MAX_HEADERS + 1:
        raise HTTPException(f"got more than {MAX_HEADERS} headers")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line[:1] in {b" ", b"\t"}:
            continue  # obsolete line folding: a continuation of a header we do not need
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip()
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return int(match.group(2)), int(match.group(1)), fields


def _skip(conn: _Conn, size: int) -> None:
    """Read and throw away ``size`` body bytes."""
    while len(conn.buf) < size:
        size -= len(conn.buf)
        conn.buf = conn.recv()
    conn.buf = conn.buf[size:]


def _line(conn: _Conn) -> bytes:
    """One line of a chunked body (size line or trailer), without its line end."""
    while (end := conn.buf.find(b"\n")) < 0:
        if len(conn.buf) > MAX_HEAD_BYTES:
            raise LineTooLong("chunk size")
        conn.buf += conn.recv()
    line, conn.buf = conn.buf[:end], conn.buf[end + 1 :]
    return line.rstrip(b"\r")


def _read_chunked(conn: _Conn) -> None:
    """Read a chunked body and its trailers."""
    while True:
        size_text = _line(conn).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HTTPException(f"invalid chunk size: {size_text!r}") from None
        if size < 0:
            raise HTTPException(f"invalid chunk size: {size_text!r}")
        if size == 0:
            while _line(conn):  # trailers, up to the empty line
                pass
            return
        _skip(conn, size)
        if _line(conn):
            raise HTTPException("chunk not followed by a line end")


def _read_to_close(conn: _Conn) -> None:
    """Read and throw away everything up to the close of the connection."""
    conn.buf = b""
    while conn.sock.recv(RECV_BYTES):
        pass


def _usable(sock: socket.socket) -> bool:
    """An idle kept-alive connection can take a request: nothing to read on it (a readable
    idle socket means the peer closed it, or sent bytes nobody asked for)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)
