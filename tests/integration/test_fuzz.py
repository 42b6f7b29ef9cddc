"""Fuzzing and hostile input against the module's leave and forget endpoints.

Two Synapses for the whole class: one in ``mount: listener`` (native Synapse on
its client listener, the module on its ``resources: []`` listener) and one in
``mount: intercept`` (the module on the client listener). Native Synapse is the
oracle: the goal is parity with it or better, never worse.

* **From the spec** (schemathesis over ``docs/api/leaving.yaml``, the
  project's OpenAPI description of the two endpoints, written from the
  Client-Server API's text): requests generated
  from the schema (positive) and against it (negative), with the generated
  credentials or with a valid access token (header, query or both), on
  generated room ids, a room the user never joined or rooms the user is in.
  Every answer of the module must be a non-5xx Matrix answer that conforms to
  the spec's response schemas; where the request is stateless (no room the user
  is in) it is also sent to native Synapse and to the intercepting module, and
  all three must agree on status and errcode.
* **Hand-written hostile input** (raw bytes on a socket, since no HTTP client
  library sends most of it): huge and deeply nested bodies, invalid UTF-8,
  NaN, duplicate keys, odd room ids, wrong methods, bad tokens, lying
  Content-Types, chunked and broken framing. Each goes to native Synapse, the
  module's listener and the intercepting module; the module must answer
  exactly as native does (or as one of the README's deliberate deviations), and
  each server must still answer afterwards.

Where native Synapse itself answers a hostile request with a 5xx, the module is
held to parity (the same answer) instead of to "no 5xx": those are Synapse's
own bugs, listed on stderr at the end of each test.
"""

import collections
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import (
    Any,
    ClassVar,
)

import attr
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from signedjson.key import read_signing_keys

from matrix_leave_forget.audit.entry import verify_chain, verify_keys_from_signing_key
from tests.integration.base import SynapseTestCase
from tests.support.harness import (
    REPO_ROOT,
    SERVER_NAME,
    SynapseProcess,
    User,
    quote_room,
    request,
)

SPEC_PATH = os.path.join(REPO_ROOT, "docs", "api", "leaving.yaml")
SPEC_BASE_PATH = "/_matrix/client/v3"
ADMIN_AUDIT = "/_synapse/client/leave_forget/v1/admin/audit"

# Examples per endpoint and generation mode (positive, negative).
FUZZ_EXAMPLES = 150
REQUEST_TIMEOUT = 60.0
# A room id no server of the test knows, of valid grammar.
UNKNOWN_ROOM = f"!hostile-unknown:{SERVER_NAME}"
TEN_MB = 10 * 1024 * 1024

FUZZ_CONFIG: dict[str, Any] = {
    "bcrypt_rounds": 4,
    # Keeps Synapse's request size limit at its floor (200 PDUs, 12.5 MiB)
    # rather than the 50 MiB media default, so "over the limit" is cheap to send.
    "max_upload_size": "1M",
}

# What an answer is compared on: the status (None: the connection closed with
# no answer) and the errcode (None: no Matrix error body).
Key = tuple[int | None, str | None]

# The module's deliberate deviation (README): a `reason` that is present, not
# null and not a string is refused before anything else happens.
BAD_REASON: Key = (400, "M_BAD_JSON")


def load_spec() -> tuple[Any, dict[str, Any]]:
    """The spec and its operations by path; fails (never skips) if the description is missing."""
    if not os.path.isfile(SPEC_PATH):
        raise AssertionError(
            f"The OpenAPI description is missing: expected {SPEC_PATH} (docs/api/leaving.yaml "
            "in this repository). The spec-driven fuzz tests cannot run without it."
        )
    try:
        schema = schemathesis.openapi.from_path(SPEC_PATH)
        results = list(schema.get_all_operations())
    except Exception as exc:
        raise AssertionError(f"Cannot load {SPEC_PATH}: {exc}") from exc
    operations = {}
    for result in results:
        if type(result).__name__ == "Err":  # e.g. a $ref that does not resolve
            raise AssertionError(f"Cannot load {SPEC_PATH}: {result.err()}")
        operation = result.ok()
        operations[operation.path] = operation
    return schema, operations


# -- raw HTTP ----------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class Answer:
    """One HTTP answer, or the absence of one (status None)."""

    status: int | None
    headers: Mapping[str, str] = attr.ib(factory=dict)
    body: bytes = b""

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    @property
    def errcode(self) -> str | None:
        body = self.json
        code = body.get("errcode") if isinstance(body, dict) else None
        return code if isinstance(code, str) else None

    @property
    def key(self) -> Key:
        return (self.status, self.errcode)

    def __str__(self) -> str:
        if self.status is None:
            return "no answer (connection closed)"
        return f"{self.status} {self.body[:160]!r}"


def message(
    method: bytes,
    path: bytes,
    body: bytes | None = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    length: bool = True,
    version: bytes = b"HTTP/1.1",
    close: bool = True,
) -> bytes:
    """An HTTP/1.1 request as bytes: exactly what is given, nothing normalised."""
    lines = [method + b" " + path + b" " + version, b"Host: localhost"]
    if close:
        lines.append(b"Connection: close")
    lines += [name + b": " + value for name, value in headers]
    if body is not None and length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    """Decode a chunked body; returns it and what follows it."""
    out = b""
    for _ in range(100000):
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            _, _, rest = data.partition(b"\r\n")
            return out, rest
        out += data[:size]
        data = data[size + 2 :]
    raise AssertionError("runaway chunked body")


def parse_answers(data: bytes, heads: Sequence[bool]) -> list[Answer]:
    """Split the bytes a server sent into answers (several when requests were pipelined)."""
    answers: list[Answer] = []
    for head in heads:
        if b"\r\n\r\n" not in data:
            answers.append(Answer(None))
            continue
        header_block, _, data = data.partition(b"\r\n\r\n")
        status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        body = b""
        if not head and status not in (204, 304):
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body, data = _dechunk(data)
            elif "content-length" in headers:
                length = int(headers["content-length"])
                body, data = data[:length], data[length:]
            else:
                body, data = data, b""
        answers.append(Answer(status, headers, body))
    return answers


def exchange(
    port: int, data: bytes, heads: Sequence[bool] = (False,), timeout: float = REQUEST_TIMEOUT
) -> list[Answer]:
    """Send raw bytes to 127.0.0.1:port, read until the server closes, parse the answers."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server gave up on the request early: read what it said, if anything
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(received) < 4 * 1024 * 1024:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        else:
            raise AssertionError(f"no end of answer from port {port} within {timeout}s")
    return parse_answers(received, heads)


# -- the servers under test ----------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class Target:
    """One place leave and forget are served, with a user of its own there."""

    name: str
    hs: SynapseProcess
    port: int
    user: User
    room: str  # a room the user is joined to; only refused requests are sent to it
    stranger: str  # a room the user never joined

    def health(self) -> int:
        return request(self.port, "GET", "/health", timeout=REQUEST_TIMEOUT).status


def start_synapse(mode: str, prefix: str) -> SynapseProcess:
    """A Synapse with the module in ``mode``, in a work directory with a prefix of our own."""
    hs = SynapseProcess(
        {"mount": mode, "forget_rate_limit": None},
        dict(FUZZ_CONFIG),
        workdir=tempfile.mkdtemp(prefix=prefix),
    )
    try:
        hs.start()
    except Exception:
        stop_synapse(hs)
        raise
    return hs


def stop_synapse(hs: SynapseProcess) -> None:
    workdir = hs.workdir
    hs.cleanup()
    if not os.environ.get("MLF_KEEP_WORKDIR"):
        shutil.rmtree(workdir, ignore_errors=True)


def make_target(name: str, hs: SynapseProcess, port: int, admin: User, localpart: str) -> Target:
    user = hs.register(localpart)
    room = hs.create_room(admin, preset="public_chat")
    stranger = hs.create_room(admin, preset="public_chat")
    resp = hs.membership(user, room, "join")
    assert resp.status == 200, f"setup: {localpart} joining: {resp.raw[:200]!r}"
    return Target(name, hs, port, user, room, stranger)


# -- hand-written hostile requests -----------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class Hostile:
    """A hostile request, built per target (its token and rooms).

    Attributes:
        module_answer: When the module deliberately answers differently from
            native Synapse (README, "Deviations"), what it answers instead.
        heads: One flag per request sent (more than one when pipelined): HEAD
            answers carry no body.
    """

    name: str
    make: Callable[[Target], bytes]
    module_answer: Key | None = None
    heads: tuple[bool, ...] = (False,)


def _bearer(t: Target) -> tuple[bytes, bytes]:
    return (b"Authorization", b"Bearer " + t.user.access_token.encode())


def _path(room_id: str, action: str = "leave", version: str = "v3") -> bytes:
    return f"/_matrix/client/{version}/rooms/{quote_room(room_id)}/{action}".encode()


def _raw_path(room_segment: bytes, action: bytes = b"leave") -> bytes:
    return b"/_matrix/client/v3/rooms/" + room_segment + b"/" + action


def _post(path: bytes, body: bytes | None = b"{}", *extra: tuple[bytes, bytes]) -> Callable:
    """A POST with the target's token in the header (the usual case)."""
    return lambda t: message(b"POST", path, body, [_bearer(t), *extra])


def _json_reason(size: int, char: str = "x") -> bytes:
    return json.dumps({"reason": char * size}).encode()


def _nested(depth: int, opening: bytes, closing: bytes, inner: bytes = b"") -> bytes:
    return opening * depth + inner + closing * depth


UNKNOWN_LEAVE = _path(UNKNOWN_ROOM)
UNKNOWN_FORGET = _path(UNKNOWN_ROOM, "forget")

BODIES = [
    Hostile("10 MB JSON reason, unknown room", _post(UNKNOWN_LEAVE, _json_reason(TEN_MB))),
    Hostile(
        "10 MB JSON reason, joined room (event too large)",
        lambda t: message(b"POST", _path(t.room), _json_reason(TEN_MB), [_bearer(t)]),
    ),
    Hostile("10 MB of non-JSON", _post(UNKNOWN_LEAVE, b"x" * TEN_MB)),
    Hostile("10 MB body on forget", _post(UNKNOWN_FORGET, _json_reason(TEN_MB))),
    Hostile("14 MB body: over the request size limit", _post(UNKNOWN_LEAVE, b" " * (14 << 20))),
    Hostile("100k nested arrays", _post(UNKNOWN_LEAVE, _nested(100000, b"[", b"]"))),
    Hostile("50k nested objects", _post(UNKNOWN_LEAVE, _nested(50000, b'{"a":', b"}", b"1"))),
    Hostile(
        "100k nested arrays in reason",
        _post(UNKNOWN_LEAVE, b'{"reason":' + _nested(100000, b"[", b"]") + b"}"),
    ),
    Hostile("invalid UTF-8 in body", _post(UNKNOWN_LEAVE, b'{"reason": "\xff\xfe"}')),
    Hostile("overlong UTF-8 in body", _post(UNKNOWN_LEAVE, b'{"reason": "\xc0\xaf"}')),
    Hostile("UTF-16 body", _post(UNKNOWN_LEAVE, '{"reason": "a"}'.encode("utf-16"))),
    Hostile("UTF-8 BOM", _post(UNKNOWN_LEAVE, b'\xef\xbb\xbf{"reason": "a"}')),
    Hostile("NaN", _post(UNKNOWN_LEAVE, b'{"reason": NaN}')),
    Hostile("Infinity", _post(UNKNOWN_LEAVE, b'{"x": Infinity}')),
    Hostile("-Infinity", _post(UNKNOWN_LEAVE, b'{"x": -Infinity}')),
    Hostile("huge number", _post(UNKNOWN_LEAVE, b'{"x": 1' + b"0" * 5000 + b"}")),
    Hostile(
        "duplicate keys, both strings", _post(UNKNOWN_LEAVE, b'{"reason": "a", "reason": "b"}')
    ),
    Hostile(
        "duplicate keys, the last a number",
        _post(UNKNOWN_LEAVE, b'{"reason": "a", "reason": 5}'),
        module_answer=BAD_REASON,
    ),
    Hostile(
        "duplicate keys, the last a string", _post(UNKNOWN_LEAVE, b'{"reason": 5, "reason": "a"}')
    ),
    Hostile(
        "lone surrogate in reason, unknown room", _post(UNKNOWN_LEAVE, b'{"reason": "\\ud800"}')
    ),
    Hostile(
        "lone surrogate in reason, joined room",
        lambda t: message(b"POST", _path(t.room), b'{"reason": "\\ud800"}', [_bearer(t)]),
    ),
    Hostile("NUL in reason", _post(UNKNOWN_LEAVE, b'{"reason": "a\\u0000b"}')),
    Hostile(
        "70 KB reason, joined room (event too large)",
        lambda t: message(b"POST", _path(t.room), _json_reason(70 * 1024), [_bearer(t)]),
    ),
    Hostile("array body", _post(UNKNOWN_LEAVE, b"[1, 2]")),
    Hostile("string body", _post(UNKNOWN_LEAVE, b'"reason"')),
    Hostile("null body", _post(UNKNOWN_LEAVE, b"null")),
    Hostile("whitespace body", _post(UNKNOWN_LEAVE, b" \r\n\t ")),
    Hostile("truncated JSON", _post(UNKNOWN_LEAVE, b'{"reason": "a')),
    Hostile("trailing garbage", _post(UNKNOWN_LEAVE, b'{"reason": "a"} x')),
    Hostile("garbage body on forget", _post(UNKNOWN_FORGET, b"\xff\xfe not json")),
]

ROOM_IDS = [
    Hostile("64 KB room id", _post(_raw_path(b"%21" + b"a" * 65536 + b"%3Atest.local"))),
    Hostile("15 KB room id, leave", _post(_raw_path(b"%21" + b"a" * 15000 + b"%3Atest.local"))),
    Hostile(
        "15 KB room id, forget",
        _post(_raw_path(b"%21" + b"a" * 15000 + b"%3Atest.local", b"forget")),
    ),
    Hostile("NUL in room id, leave", _post(_raw_path(b"%21a%00b%3Atest.local"))),
    Hostile("NUL in room id, forget", _post(_raw_path(b"%21a%00b%3Atest.local", b"forget"))),
    Hostile(
        "NUL in room id, PUT leave",
        lambda t: message(b"PUT", _raw_path(b"%00") + b"/t1", b"{}", [_bearer(t)]),
    ),
    Hostile("space in room id", _post(_raw_path(b"%21a%20b%3Atest.local", b"forget"))),
    Hostile("unicode room id", _post(_path(f"!\u00fc\u2603\U0001f600:{SERVER_NAME}", "forget"))),
    Hostile("encoded slash in room id", _post(_raw_path(b"%21a%2Fb%3Atest.local"))),
    Hostile("'..' as room id", _post(_raw_path(b".."))),
    Hostile("'%2E%2E' as room id", _post(_raw_path(b"%2E%2E", b"forget"))),
    Hostile("empty room id, leave", _post(_raw_path(b""))),
    Hostile("empty room id, forget", _post(_raw_path(b"", b"forget"))),
    Hostile("invalid UTF-8 (percent-encoded) in room id", _post(_raw_path(b"%FF%FE"))),
    Hostile("encoded lone surrogate in room id", _post(_raw_path(b"%21%ED%A0%80%3Atest.local"))),
    Hostile("raw non-ASCII byte in path", _post(_raw_path(b"\xff"))),
    Hostile("raw space in path", _post(_raw_path(b"a b"))),
    Hostile("bad percent escape", _post(_raw_path(b"%zz%"))),
    Hostile("room id with query-like text", _post(_raw_path(b"%21a%3Fb%3Dc%3Atest.local"))),
    Hostile("double slash in path", _post(b"/_matrix/client/v3/rooms//%21a%3Atest.local/leave")),
    Hostile("trailing slash", _post(UNKNOWN_LEAVE + b"/")),
    Hostile(
        "PUT with an empty txnId",
        lambda t: message(b"PUT", UNKNOWN_LEAVE + b"/", b"{}", [_bearer(t)]),
    ),
    Hostile(
        "PUT with a NUL txnId",
        lambda t: message(b"PUT", UNKNOWN_LEAVE + b"/a%00b", b"{}", [_bearer(t)]),
    ),
    Hostile(
        "PUT with a 10 KB txnId",
        lambda t: message(b"PUT", UNKNOWN_FORGET + b"/" + b"t" * 10000, b"{}", [_bearer(t)]),
    ),
    Hostile(
        "PUT with a txnId and more",
        lambda t: message(b"PUT", UNKNOWN_LEAVE + b"/t/u", b"{}", [_bearer(t)]),
    ),
    Hostile("absolute URI", _post(b"http://localhost" + UNKNOWN_LEAVE)),
    Hostile("fragment", _post(UNKNOWN_LEAVE + b"#frag")),
    Hostile("junk query string", _post(UNKNOWN_LEAVE + b"?%FF=%FF&a&=&access")),
]


def _method(method: bytes, path: bytes, head: bool = False) -> Hostile:
    return Hostile(
        f"{method.decode()} {path.decode()[-6:]}",
        lambda t: message(method, path, b"", [_bearer(t)]),
        heads=(head,),
    )


OPTIONS_LEAVE = _method(b"OPTIONS", UNKNOWN_LEAVE)
METHODS = [
    *(
        _method(m, p)
        for m in (b"GET", b"DELETE", b"PATCH", b"FOO")
        for p in (UNKNOWN_LEAVE, UNKNOWN_FORGET)
    ),
    OPTIONS_LEAVE,
    _method(b"OPTIONS", UNKNOWN_FORGET),
    _method(b"HEAD", UNKNOWN_LEAVE, head=True),
    _method(b"HEAD", UNKNOWN_FORGET, head=True),
    Hostile("POST with a txnId", _post(UNKNOWN_LEAVE + b"/txn")),
    Hostile("PUT without a txnId", lambda t: message(b"PUT", UNKNOWN_FORGET, b"{}", [_bearer(t)])),
    Hostile(
        "GET with a txnId", lambda t: message(b"GET", UNKNOWN_LEAVE + b"/txn", b"", [_bearer(t)])
    ),
    Hostile("lower-case method", _method(b"post", UNKNOWN_LEAVE).make),
]


def _token_case(
    name: str, *headers: tuple[bytes, bytes], query: bytes = b"", path: bytes = UNKNOWN_LEAVE
) -> Hostile:
    return Hostile(name, lambda t: message(b"POST", path + query, b"{}", list(headers)))


TOKENS = [
    _token_case("no token"),
    _token_case("empty Bearer", (b"Authorization", b"Bearer ")),
    _token_case("'Bearer' alone", (b"Authorization", b"Bearer")),
    _token_case("lower-case bearer", (b"Authorization", b"bearer syt_whatever")),
    _token_case("Basic auth", (b"Authorization", b"Basic Zm9vOmJhcg==")),
    _token_case("non-ASCII (latin-1) token", (b"Authorization", b"Bearer t\xf6k\xff")),
    _token_case("UTF-8 token", (b"Authorization", b"Bearer t\xc3\xb6k")),
    _token_case("control characters in token", (b"Authorization", b"Bearer a\x01\x7fb")),
    # Base64 of nothing: Synapse's guest-macaroon fallback trips over it.
    _token_case("token '='", (b"Authorization", b"Bearer =")),
    _token_case("token 'ab'", (b"Authorization", b"Bearer ab")),
    _token_case("15 KB token", (b"Authorization", b"Bearer " + b"a" * 15000)),
    _token_case("64 KB token", (b"Authorization", b"Bearer " + b"a" * 65536)),
    Hostile(
        "token in header and query",
        lambda t: message(
            b"POST",
            UNKNOWN_LEAVE + b"?access_token=" + t.user.access_token.encode(),
            b"{}",
            [_bearer(t)],
        ),
    ),
    Hostile(
        "valid token in query only",
        lambda t: message(
            b"POST", UNKNOWN_LEAVE + b"?access_token=" + t.user.access_token.encode()
        ),
    ),
    _token_case("empty query token", query=b"?access_token="),
    _token_case("invalid UTF-8 query token", query=b"?access_token=%FF%00"),
    Hostile(
        "two query tokens",
        lambda t: message(
            b"POST",
            UNKNOWN_LEAVE + b"?access_token=" + t.user.access_token.encode() + b"&access_token=x",
        ),
    ),
    Hostile(
        "two Authorization headers",
        lambda t: message(
            b"POST", UNKNOWN_LEAVE, b"{}", [_bearer(t), (b"Authorization", b"Bearer x")]
        ),
    ),
    _token_case("forget without a token", path=UNKNOWN_FORGET),
    _token_case(
        "forget with a bogus token", (b"Authorization", b"Bearer nope"), path=UNKNOWN_FORGET
    ),
]

FRAMING = [
    Hostile(
        "JSON sent as text/plain",
        _post(UNKNOWN_LEAVE, b'{"reason": "a"}', (b"Content-Type", b"text/plain")),
    ),
    Hostile(
        "form body sent as form",
        _post(UNKNOWN_LEAVE, b"reason=a", (b"Content-Type", b"application/x-www-form-urlencoded")),
    ),
    Hostile(
        "form body sent as JSON",
        _post(UNKNOWN_LEAVE, b"reason=a", (b"Content-Type", b"application/json")),
    ),
    Hostile(
        "multipart body",
        _post(
            UNKNOWN_LEAVE,
            b'--b\r\nContent-Disposition: form-data; name="reason"\r\n\r\nx\r\n--b--\r\n',
            (b"Content-Type", b"multipart/form-data; boundary=b"),
        ),
    ),
    Hostile(
        "latin-1 JSON declared as latin-1",
        _post(
            UNKNOWN_LEAVE,
            '{"reason": "\u00e9"}'.encode("latin-1"),
            (b"Content-Type", b"application/json; charset=latin-1"),
        ),
    ),
    Hostile(
        "chunked body",
        lambda t: (
            message(b"POST", UNKNOWN_LEAVE, None, [_bearer(t), (b"Transfer-Encoding", b"chunked")])
            + b'5\r\n{"rea\r\nA\r\nson": "a"}\r\n0\r\n\r\n'
        ),
    ),
    Hostile(
        "chunked body with an extension",
        lambda t: (
            message(b"POST", UNKNOWN_LEAVE, None, [_bearer(t), (b"Transfer-Encoding", b"chunked")])
            + b"2;x=y\r\n{}\r\n0\r\n\r\n"
        ),
    ),
    Hostile(
        "malformed chunk size",
        lambda t: (
            message(b"POST", UNKNOWN_LEAVE, None, [_bearer(t), (b"Transfer-Encoding", b"chunked")])
            + b"zz\r\n{}\r\n0\r\n\r\n"
        ),
    ),
    Hostile(
        "Content-Length and chunked",
        lambda t: (
            message(
                b"POST",
                UNKNOWN_LEAVE,
                None,
                [_bearer(t), (b"Content-Length", b"4"), (b"Transfer-Encoding", b"chunked")],
            )
            + b"2\r\n{}\r\n0\r\n\r\n"
        ),
    ),
    Hostile(
        "non-numeric Content-Length",
        lambda t: (
            message(b"POST", UNKNOWN_LEAVE, None, [_bearer(t), (b"Content-Length", b"abc")]) + b"{}"
        ),
    ),
    Hostile(
        "negative Content-Length",
        lambda t: (
            message(b"POST", UNKNOWN_LEAVE, None, [_bearer(t), (b"Content-Length", b"-1")]) + b"{}"
        ),
    ),
    Hostile(
        "Content-Length shorter than the body",
        lambda t: (
            message(b"POST", UNKNOWN_LEAVE, None, [_bearer(t), (b"Content-Length", b"1")]) + b"{}"
        ),
    ),
    Hostile(
        "two Content-Lengths",
        lambda t: (
            message(
                b"POST",
                UNKNOWN_LEAVE,
                None,
                [_bearer(t), (b"Content-Length", b"2"), (b"Content-Length", b"3")],
            )
            + b"{} "
        ),
    ),
    Hostile(
        "HTTP/1.0",
        lambda t: message(b"POST", UNKNOWN_LEAVE, b"{}", [_bearer(t)], version=b"HTTP/1.0"),
    ),
    Hostile("HTTP/0.9-style request line", lambda t: b"POST " + UNKNOWN_LEAVE + b"\r\n\r\n"),
    Hostile(
        "unknown HTTP version",
        lambda t: message(b"POST", UNKNOWN_LEAVE, b"{}", [_bearer(t)], version=b"HTTP/7.1"),
    ),
    Hostile(
        "header without a colon",
        lambda t: message(b"POST", UNKNOWN_LEAVE, b"{}", [_bearer(t), (b"X-Broken", b"")]).replace(
            b"X-Broken: ", b"X-Broken "
        ),
    ),
    Hostile(
        "leave and forget pipelined",
        lambda t: (
            message(b"POST", UNKNOWN_LEAVE, b"{}", [_bearer(t)], close=False)
            + message(b"POST", UNKNOWN_FORGET, b"{}", [_bearer(t)])
        ),
        heads=(False, False),
    ),
]


class FuzzTests(SynapseTestCase):
    """Spec-driven fuzzing and hostile input, module against native Synapse."""

    MODE = "listener"
    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"forget_rate_limit": None}
    EXTRA_CONFIG: ClassVar[dict[str, Any]] = FUZZ_CONFIG

    intercept_hs: ClassVar[SynapseProcess | None] = None
    admins: ClassVar[dict[int, User]]
    native: ClassVar[Target]
    listener: ClassVar[Target]
    intercept: ClassVar[Target]
    fuzz_rooms: ClassVar[list[str]]
    _up: ClassVar[bool] = False

    @classmethod
    def setUpClass(cls) -> None:
        if cls.__dict__.get("_up"):
            return
        cls.hs = start_synapse("listener", "mlf-fuzz-listener-")
        try:
            cls.intercept_hs = start_synapse("intercept", "mlf-fuzz-intercept-")
            admin = cls.hs.register("fuzzadmin", admin=True)
            icpt_admin = cls.intercept_hs.register("fuzzadmin", admin=True)
            cls.admins = {cls.hs.client_port: admin, cls.intercept_hs.client_port: icpt_admin}
            cls.native = make_target("native", cls.hs, cls.hs.client_port, admin, "native")
            cls.listener = make_target(
                "module (listener)", cls.hs, cls.hs.module_port, admin, "mod"
            )
            icpt = cls.intercept_hs
            cls.intercept = make_target(
                "module (intercept)",
                icpt,
                icpt.client_port,
                icpt_admin,
                "icpt",
            )
            # Rooms the module listener's user is in, for the stateful fuzz examples.
            cls.fuzz_rooms = []
            for _ in range(3):
                room = cls.hs.create_room(admin, preset="public_chat")
                assert cls.hs.membership(cls.listener.user, room, "join").status == 200
                cls.fuzz_rooms.append(room)
        except BaseException:
            cls._stop_all()
            raise
        cls._up = True

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.__dict__.get("_up"):
            cls._up = False
            cls._stop_all()

    @classmethod
    def _stop_all(cls) -> None:
        if cls.intercept_hs is not None:
            stop_synapse(cls.intercept_hs)
            cls.intercept_hs = None
        if "hs" in cls.__dict__:
            stop_synapse(cls.hs)
            del cls.hs

    @property
    def modules(self) -> list[Target]:
        return [self.listener, self.intercept]

    # -- the spec ---------------------------------------------------------------

    def test_spec_is_present_and_loads(self) -> None:
        """The repository's OpenAPI description (docs/api/leaving.yaml) is there,
        loads with its $refs resolved, serves under /_matrix/client/v3 and
        describes exactly the two endpoints: a missing or moved file fails here
        with a message that says where it was looked for."""
        schema, operations = load_spec()
        self.assertEqual(schema.base_path.rstrip("/"), SPEC_BASE_PATH)
        self.assertEqual(sorted(operations), ["/rooms/{roomId}/forget", "/rooms/{roomId}/leave"])
        for operation in operations.values():
            self.assertEqual(operation.method.upper(), "POST")
            # Resolving the response schemas follows the components' $refs.
            self.assertIsNotNone(operation.as_strategy().example())

    def test_fuzz_leave_from_spec(self) -> None:
        """POST /rooms/{roomId}/leave, generated from and against the spec
        (150 positive and 150 negative examples, reproducible): the module
        never answers 5xx, every error is a Matrix error conforming to the spec,
        and on stateless requests it agrees with native Synapse and with itself
        in intercept mode (save the documented non-string reason deviation)."""
        self.fuzz("/rooms/{roomId}/leave")

    def test_fuzz_forget_from_spec(self) -> None:
        """POST /rooms/{roomId}/forget, generated from and against the spec
        (150 positive and 150 negative examples, reproducible): no 5xx, Matrix
        errors conforming to the spec, and agreement with native Synapse and the
        intercepting module on stateless requests."""
        self.fuzz("/rooms/{roomId}/forget")

    def fuzz(self, path: str) -> None:
        _, operations = load_spec()
        operation = operations[path]
        problems: list[str] = []
        synapse_5xx: list[str] = []
        tally: Counter[str] = collections.Counter()
        sessions = {t.name: requests.Session() for t in (self.native, *self.modules)}
        self.addCleanup(lambda: [s.close() for s in sessions.values()])

        def send(case: Any, target: Target, auth: str, garbage: str, room: str) -> Any:
            """The target's Answer and requests' response; None if the client cannot send it."""
            self.shape(case, target, auth, garbage, room)
            try:
                return self.send_case(case, target, sessions[target.name])
            except (
                UnicodeError,
                requests.exceptions.InvalidHeader,
                requests.exceptions.InvalidURL,
            ):
                # e.g. a generated header value outside latin-1: nothing goes on the wire
                tally["not sendable by the HTTP client"] += 1
                return None

        def run(case: Any, auth: str, garbage: str, room: str) -> None:
            # Stateful examples (rooms the module listener's user is in) go to the
            # module's listener only; stateless ones to native and both modules.
            stateful = room == "joined"
            targets = [self.listener] if stateful else [self.native, *self.modules]
            sent = {}
            for target in targets:
                result = send(case, target, auth, garbage, room)
                if result is None:
                    return
                sent[target.name] = result
            where = (
                f"{case.method} {case.formatted_path} auth={auth} room={room} "
                f"body={_short(case.body)}"
            )
            native = sent[self.native.name][0] if not stateful else None
            for target in targets if stateful else self.modules:
                answer, response = sent[target.name]
                tally[f"{target.name}: {answer.key}"] += 1
                oracle = native
                if oracle is None and (answer.status or 0) >= 500:
                    # A 5xx on a stateful example: ask native the same request, on a
                    # room where it changes nothing, whether the 5xx is Synapse's own.
                    result = send(case, self.native, auth, garbage, "stranger")
                    oracle = result[0] if result is not None else None
                for problem in self.answer_problems(answer, oracle):
                    problems.append(f"{target.name}: {problem}: {where} -> {answer}")
                if native is not None and answer.key != native.key:
                    if not (answer.key == BAD_REASON and _bad_reason(case.body)):
                        problems.append(
                            f"{target.name} differs from native: {where}: "
                            f"native {native}, module {answer}"
                        )
                if oracle is not None and oracle.key == answer.key and (answer.status or 0) >= 500:
                    synapse_5xx.append(f"{where} -> {answer.status}")
                if response is not None:
                    self.shape(case, target, auth, garbage, room)
                    for problem in self.spec_problems(case, response):
                        problems.append(f"{target.name}: {problem}: {where}")

        # Credentials and rooms go round-robin over the examples (7 and 5 are
        # coprime, so every pairing comes up every 35 examples): hypothesis's
        # sampled_from would mostly pick the first choice.
        auths = ["header", "query", "generated", "garbage", "header", "both", "header"]
        rooms = ["generated", "stranger", "generated", "unknown", "joined"]
        counter = iter(range(10**6))

        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(
                case=operation.as_strategy(generation_mode=mode),
                garbage=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
            )
            def examples(case: Any, garbage: str) -> None:
                i = next(counter)
                run(case, auths[i % len(auths)], garbage, rooms[i % len(rooms)])

            examples()

        sys.stderr.write(f"\n[fuzz {path}] answers: {dict(sorted(tally.items()))}\n")
        if synapse_5xx:
            sys.stderr.write(
                f"[fuzz {path}] native Synapse answers these with 5xx too (parity): "
                f"{sorted(set(synapse_5xx))[:10]}\n"
            )
        self.assertEqual(problems[:20], [], f"{len(problems)} problems")

    def shape(self, case: Any, target: Target, auth: str, garbage: str, room: str) -> None:
        """Put the target's credentials and room into a generated case, as drawn."""
        headers = dict(case.headers or {})
        query = dict(case.query or {})
        token = target.user.access_token
        if auth != "generated":
            headers.pop("Authorization", None)
            query.pop("access_token", None)
        if auth in ("header", "both"):
            headers["Authorization"] = f"Bearer {token}"
        if auth in ("query", "both"):
            query["access_token"] = token
        if auth == "garbage":
            headers["Authorization"] = f"Bearer {garbage}"
        case.headers = headers
        case.query = query
        if room == "joined":
            # Stateful: sent to the module's listener only, whose user is in these rooms.
            index = sum(map(ord, garbage)) % len(self.fuzz_rooms)
            case.path_parameters = {"roomId": quote_room(self.fuzz_rooms[index])}
        elif room == "stranger":
            case.path_parameters = {"roomId": quote_room(target.stranger)}
        elif room == "unknown":
            case.path_parameters = {"roomId": quote_room(UNKNOWN_ROOM)}

    def send_case(
        self, case: Any, target: Target, session: requests.Session
    ) -> tuple[Answer, requests.Response | None]:
        """Send a generated case to a target; (Answer(None), None) if the connection dropped."""
        kwargs = case.as_transport_kwargs(
            base_url=f"http://127.0.0.1:{target.port}{SPEC_BASE_PATH}"
        )
        try:
            response = session.request(**kwargs, timeout=REQUEST_TIMEOUT, allow_redirects=False)
        except requests.exceptions.ConnectionError:
            return Answer(None), None
        answer = Answer(
            response.status_code,
            {k.lower(): v for k, v in response.headers.items()},
            response.content,
        )
        return answer, response

    @staticmethod
    def spec_problems(case: Any, response: requests.Response) -> list[str]:
        """schemathesis's checks: documented answers match the spec's schemas and media types."""
        try:
            case.validate_response(
                response,
                checks=[
                    schemathesis.checks.response_schema_conformance,
                    schemathesis.checks.content_type_conformance,
                ],
            )
        except Exception as exc:  # schemathesis raises a FailureGroup of check failures
            return [f"does not conform to the spec: {exc}"]
        return []

    @staticmethod
    def answer_problems(answer: Answer, native: Answer | None) -> list[str]:
        """What is wrong with one module answer on its own (native: the same request's answer)."""
        if answer.status is None:
            return [] if native is not None and native.status is None else ["no answer"]
        if answer.status >= 500 and (native is None or native.key != answer.key):
            return ["server error"]
        if 200 <= answer.status < 300:
            if isinstance(answer.json, dict):
                return []
            if native is not None and native.status == answer.status and native.body == answer.body:
                return []  # e.g. OPTIONS: Synapse's own 204 with no body
            return ["2xx without a JSON object"]
        body = answer.json
        if not isinstance(body, dict) or not isinstance(body.get("errcode"), str):
            if native is not None and native.errcode is None and native.status == answer.status:
                return []  # Twisted's own bare answer, before Synapse or the module run
            return ["error without a string errcode"]
        if not isinstance(body.get("error"), str):
            return ["error without a string error"]
        return []

    # -- hostile input ------------------------------------------------------------

    def test_hostile_bodies(self) -> None:
        """Huge (10 MB, and over Synapse's 12.5 MiB request limit), deeply nested
        (100k), invalid UTF-8, UTF-16, NaN/Infinity, duplicate-key, surrogate
        and non-object bodies: the module answers each exactly as native Synapse
        (the non-string reason deviation aside), never worse, and every server
        still answers afterwards."""
        self.check_hostile(BODIES)

    def test_hostile_room_ids(self) -> None:
        """Room ids of 64 KB and 15 KB, with NUL, spaces, unicode, %2F, '..',
        empty, invalid UTF-8, raw non-ASCII bytes, bad escapes, and odd txnIds:
        the module answers as native Synapse does on each, and stays up."""
        self.check_hostile(ROOM_IDS)

    def test_hostile_methods(self) -> None:
        """GET, DELETE, PATCH, HEAD, OPTIONS and an unknown method on leave and
        forget, POST with a txnId and PUT without one: the same answers as native
        Synapse (405 M_UNRECOGNIZED, OPTIONS 204 with CORS headers)."""
        self.check_hostile(METHODS)
        for target in self.modules:
            answer = exchange(target.port, OPTIONS_LEAVE.make(target))[0]
            self.assertEqual(answer.headers.get("access-control-allow-origin"), "*", target.name)

    def test_hostile_tokens(self) -> None:
        """Missing, empty, malformed, non-ASCII, 15 KB and 64 KB tokens, tokens in
        both header and query, duplicated tokens: the same answers as native."""
        self.check_hostile(TOKENS)

    def test_hostile_framing(self) -> None:
        """Lying Content-Types, chunked bodies (valid, with extensions, malformed),
        conflicting or bogus Content-Length, HTTP/1.0 and odd request lines,
        pipelined requests: the same answers as native Synapse."""
        self.check_hostile(FRAMING)

    def check_hostile(self, cases: Sequence[Hostile]) -> None:
        problems: list[str] = []
        synapse_5xx: list[str] = []
        for case in cases:
            native = exchange(self.native.port, case.make(self.native), case.heads)
            for target in self.modules:
                answers = exchange(target.port, case.make(target), case.heads)
                for index, (answer, oracle) in enumerate(zip(answers, native, strict=True)):
                    name = f"{case.name}" + (f" (#{index + 1})" if len(answers) > 1 else "")
                    expected = case.module_answer or oracle.key
                    if answer.key != expected:
                        problems.append(
                            f"{target.name}: {name}: module {answer}, native {oracle}"
                            + (f", expected {expected}" if case.module_answer else "")
                        )
                    elif not case.heads[index]:
                        for problem in self.answer_problems(answer, oracle):
                            problems.append(f"{target.name}: {name}: {problem}: {answer}")
                    if (answer.status or 0) >= 500 and answer.key == oracle.key:
                        synapse_5xx.append(f"{name}: {answer.status}")
                    if oracle.status is None:
                        synapse_5xx.append(f"{name}: no answer from native either")
                status = target.health()
                if status != 200:
                    problems.append(f"{target.name}: /health {status} after {case.name}")
            if self.native.health() != 200:
                problems.append(f"native: /health failed after {case.name}")
        # Everything still works: an ordinary forget through every module target.
        for target in self.modules:
            resp = request(
                target.port,
                "POST",
                UNKNOWN_FORGET.decode(),
                {},
                token=target.user.access_token,
            )
            self.assertEqual((resp.status, resp.body), (200, {}), target.name)
        if synapse_5xx:
            sys.stderr.write(
                "\n[hostile] same answer from native Synapse (parity, Synapse's own): "
                + "; ".join(sorted(set(synapse_5xx)))
                + "\n"
            )
        self.assertEqual(problems, [])
        self.assert_chains_intact()

    def assert_chains_intact(self) -> None:
        """Each module server's whole audit log still verifies (seq, hash links, signatures)."""
        for hs in (self.hs, self.intercept_hs):
            assert hs is not None
            entries: list[dict[str, Any]] = []
            after = 0
            for _ in range(1000):
                page = request(
                    hs.client_port,
                    "GET",
                    f"{ADMIN_AUDIT}?from={after}&limit=1000",
                    token=self.admins[hs.client_port].access_token,
                    timeout=REQUEST_TIMEOUT,
                )
                self.assertEqual(page.status, 200, page.raw[:200])
                entries += page.body["entries"]
                if "next_from" not in page.body:
                    break
                after = page.body["next_from"]
            with open(os.path.join(hs.workdir, "signing.key")) as f:
                keys = verify_keys_from_signing_key(read_signing_keys(f)[0])
            result = verify_chain(entries, SERVER_NAME, keys)
            self.assertTrue(result.ok, f"{hs.module_config}: {result.bad_seq}: {result.problem}")
            self.assertEqual(result.checked, len(entries))

    def test_oversized_refused_reason_is_not_stored_whole(self) -> None:
        """A refused leave with a 1 MB reason is audited with the reason cut to a
        short prefix (docs/audit.md, "Growth bound"), so one request cannot grow
        the append-only log by the request size limit."""
        user = self.hs.register(f"oversized{time.monotonic_ns()}")
        resp = request(
            self.hs.module_port,
            "POST",
            UNKNOWN_LEAVE.decode(),
            {"reason": "x" * (1 << 20)},
            token=user.access_token,
        )
        self.assertEqual(resp.status, 404)
        (entry,) = self.audit_of(user)
        self.assertLessEqual(len(entry["reason"].encode()), 65536)

    def test_refused_leave_with_lone_surrogate_reason_is_audited(self) -> None:
        """A leave refused by Synapse (unknown room, 404 M_UNKNOWN) whose reason
        holds a lone surrogate ("\\ud800", valid JSON, not valid UTF-8) is still
        audited: the stored reason is escaped reversibly (docs/audit.md, "Any text")."""
        user = self.hs.register(f"surrogate{time.monotonic_ns()}")
        answer = exchange(
            self.hs.module_port,
            message(
                b"POST",
                UNKNOWN_LEAVE,
                b'{"reason": "\\ud800"}',
                [(b"Authorization", b"Bearer " + user.access_token.encode())],
            ),
        )[0]
        self.assertEqual(answer.key, (404, "M_UNKNOWN"))
        self.assertEqual(len(self.audit_of(user)), 1)

    def audit_of(self, user: User) -> list[dict[str, Any]]:
        """The listener server's audit entries for one user (a single page)."""
        page = request(
            self.hs.client_port,
            "GET",
            f"{ADMIN_AUDIT}?user_id={quote_room(user.user_id)}&limit=1000",
            token=self.admins[self.hs.client_port].access_token,
            timeout=REQUEST_TIMEOUT,
        )
        self.assertEqual(page.status, 200, page.raw[:200])
        return list(page.body["entries"])


def _short(body: Any) -> str:
    text = repr(body)
    return text if len(text) < 120 else text[:120] + "..."


def _bad_reason(body: Any) -> bool:
    """Whether the module's documented deviation applies: a present, non-null, non-string reason."""
    return (
        isinstance(body, dict)
        and body.get("reason") is not None
        and not isinstance(body["reason"], str)
    )
