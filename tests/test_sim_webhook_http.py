"""The webhook sender's HTTP client against a scripted receiver on a real socket: what it
sends, how it frames each kind of answer, and when it reuses a connection; over TLS too,
with a certificate from a test CA (trustme) that the client trusts through SSL_CERT_FILE,
as a user with a private CA would."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from wavespeed_sim.webhook_http import WebhookClient

HEADERS = {"content-type": "application/json", "webhook-id": "abc"}


class Scripted:
    """A receiver that answers each request with the next canned bytes (None: hang up
    without answering), recording every request and how many connections it accepted."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answers: list[bytes | None] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):  # the client refused the certificate
                conn.close()
                return
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                answer = self.answers.pop(0)
                if answer is None:
                    return
                conn.sendall(answer)
                closing = b"close" in answer.lower() or answer.startswith(b"HTTP/1.0")
                if closing and b"keep-alive" not in answer.lower():
                    return

    def url(self, path: str = "/hook?job=1&t=x", host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def receiver() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.close()


@pytest.fixture
def client() -> Iterator[WebhookClient]:
    http = WebhookClient()
    yield http
    http.close()


def test_request_bytes_as_http_client_sent_them(receiver: Scripted, client: WebhookClient) -> None:
    receiver.answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 2
    assert client.post(receiver.url(), b'{"a":1}', HEADERS, 5.0) == 200
    host = f"127.0.0.1:{receiver.port}"
    assert (
        receiver.requests[0]
        == (
            f"POST /hook?job=1&t=x HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n"
            "Content-Length: 7\r\ncontent-type: application/json\r\nwebhook-id: abc\r\n\r\n"
            '{"a":1}'
        ).encode()
    )
    # user:password@ in the URL: basic auth; no path: "/".
    url = f"http://us%40er:p%3Ass@127.0.0.1:{receiver.port}"
    assert client.post(url, b"", HEADERS, 5.0) == 200
    token = base64.b64encode(b"us@er:p:ss").decode()
    assert receiver.requests[1].startswith(b"POST / HTTP/1.1\r\n")
    assert f"\r\nauthorization: Basic {token}\r\n".encode() in receiver.requests[1]
    assert receiver.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF line ends
        b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok",  # no reason phrase
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    ],
)
def test_framed_answers_keep_the_connection(
    receiver: Scripted, client: WebhookClient, answer: bytes
) -> None:
    receiver.answers = [answer] * 3
    statuses = [client.post(receiver.url(), b"{}", HEADERS, 5.0) for _ in range(3)]
    assert statuses == [int(answer.rsplit(b"HTTP/1.", 1)[1][2:5])] * 3
    assert receiver.connections == 1


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 200),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
        (b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nbody up to the close", 500),
        (b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nConnection: close\r\n\r\n", 302),
    ],
)
def test_closing_answers_are_read_and_the_next_post_reconnects(
    receiver: Scripted, client: WebhookClient, answer: bytes, status: int
) -> None:
    receiver.answers = [answer, answer]
    assert client.post(receiver.url(), b"{}", HEADERS, 5.0) == status
    assert client.post(receiver.url(), b"{}", HEADERS, 5.0) == status  # not followed, not resent
    assert receiver.connections == 2 and len(receiver.requests) == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (None, http.client.RemoteDisconnected),
        (b"HTP/1.1 200 OK\r\n\r\n", http.client.BadStatusLine),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", http.client.HTTPException),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nshort",
            http.client.IncompleteRead,
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", http.client.HTTPException),
    ],
)
def test_broken_answers_fail_the_attempt_without_resending(
    receiver: Scripted, client: WebhookClient, answer: bytes | None, error: type[Exception]
) -> None:
    receiver.answers = [answer, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]
    with pytest.raises((OSError, http.client.HTTPException)) as raised:
        client.post(receiver.url(), b"{}", HEADERS, 5.0)
    assert isinstance(raised.value, error)
    assert len(receiver.requests) == 1  # no silent resend
    assert client.post(receiver.url(), b"{}", HEADERS, 5.0) == 200  # on a new connection
    assert receiver.connections == 2


def test_a_silent_receiver_times_out(client: WebhookClient) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        with pytest.raises(TimeoutError):
            client.post(url, b"{}", HEADERS, 0.2)


def test_urls_it_cannot_send_to(client: WebhookClient) -> None:
    with pytest.raises(ValueError, match="absolute"):
        client.post("ftp://example.com/x", b"", HEADERS, 1.0)
    with pytest.raises(http.client.InvalidURL):
        client.post("http://127.0.0.1:9/a b", b"", HEADERS, 1.0)
    with pytest.raises(ConnectionRefusedError):
        client.post("http://127.0.0.1:9/", b"", HEADERS, 1.0)  # the discard port: closed


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_receiver(ca: trustme.CA) -> Iterator[Scripted]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    server = Scripted(tls=context)
    yield server
    server.close()


def _trust(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `ca` the only one the client trusts (read when it makes its TLS context)."""
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def test_https_posts_verify_the_certificate_and_keep_the_connection(
    tls_receiver: Scripted,
    client: WebhookClient,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _trust(ca, tmp_path, monkeypatch)
    tls_receiver.answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]
    url = tls_receiver.url(host="localhost")
    statuses = [client.post(url, b'{"a":1}', HEADERS, 5.0) for _ in range(3)]
    assert statuses == [200, 200, 204]
    # One TLS connection for all three (an idle TLS socket is checked like a plain one).
    assert tls_receiver.connections == 1
    assert all(
        request.startswith(b"POST /hook?job=1&t=x HTTP/1.1\r\n")
        and f"\r\nHost: localhost:{tls_receiver.port}\r\n".encode() in request
        and request.endswith(b'\r\n\r\n{"a":1}')
        for request in tls_receiver.requests
    )


@pytest.mark.parametrize("case", ["untrusted CA", "name not on the certificate"])
def test_https_to_a_certificate_it_cannot_verify_fails_the_attempt(
    tls_receiver: Scripted,
    client: WebhookClient,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    _trust(trustme.CA() if case == "untrusted CA" else ca, tmp_path, monkeypatch)
    host = "localhost" if case == "untrusted CA" else "127.0.0.1"  # issued for localhost
    tls_receiver.answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]
    with pytest.raises(ssl.SSLCertVerificationError):  # an OSError: a failed attempt
        client.post(tls_receiver.url(host=host), b"{}", HEADERS, 5.0)
    assert tls_receiver.requests == []  # nothing was sent to it
