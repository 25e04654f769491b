"""Tests for inproc_bridge.  Run: python -m pytest -W error test_inproc_bridge.py"""

import contextvars
import functools
import gc
import http.client
import http.server
import io
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from wsgiref.validate import validator

import pytest

import inproc_bridge as ib

WAIT = 10  # seconds any event wait may take before the test calls it a hang


# ---------------------------------------------------------------------------
# App factories
# ---------------------------------------------------------------------------


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A handler class that does not log to stderr."""

    def log_message(self, format, *args):
        pass


def _handler(**methods):
    """A QuietHandler subclass with the given do_* methods."""
    return type("TestHandler", (QuietHandler,), methods)


def _respond(handler, status=200, body=b"", headers=(), reason=None):
    handler.send_response(status, reason)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _wsgi(status="200 OK", headers=(("Content-Type", "text/plain"),), body=(b"ok",)):
    def app(environ, start_response):
        start_response(status, list(headers))
        return list(body)

    return validator(app)


def _read_input(stream):
    """Read wsgi.input to EOF (wsgi.input_terminated), as validator allows:
    read() always with a size."""
    parts = []
    while True:
        part = stream.read(8192)
        if not part:
            return b"".join(parts)
        parts.append(part)


def _opener(apps, **kwargs):
    return urllib.request.build_opener(ib.InProcHandler(apps, **kwargs))


# Each WSGI behaviour runs on both paths: the caller's thread (no timeout)
# and a worker thread (a timeout).
WSGI_TIMEOUTS = [pytest.param(None, id="inline"), pytest.param(5, id="worker")]
PATHS = [
    pytest.param(("handler", None), id="handler"),
    pytest.param(("wsgi", None), id="wsgi-inline"),
    pytest.param(("wsgi", 5), id="wsgi-worker"),
]


# ---------------------------------------------------------------------------
# Public surface
# ---------------------------------------------------------------------------


def test_all_matches_public_names():
    public = {
        name
        for name, value in vars(ib).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "inproc_bridge") == "inproc_bridge"
        and (callable(value) or (name.isupper() and isinstance(value, str)))
        and name not in ("main",)
    }
    public.add("SOURCE_AGENTS")
    assert set(ib.__all__) == public
    for name in ib.__all__:
        assert getattr(ib, name).__doc__, name


def test_bridge_error_is_urlerror():
    assert issubclass(ib.BridgeError, urllib.error.URLError)
    assert isinstance(ib.SOURCE_AGENTS, ib.Source) and ib.SOURCE_AGENTS == "agents"
    assert issubclass(ib.BodyPipe, io.RawIOBase)


def test_handler_has_no_helper_named_like_an_urllib_hook():
    # OpenerDirector registers methods by name; only real hooks may match.
    hooks = {"inproc_open", "http_open", "https_open", "inproc_request", "inproc_response"}
    hooks |= {"http_error_%d" % code for code in (301, 302, 303, 307, 308)}
    for name in dir(ib.InProcHandler):
        if name.startswith("_"):
            continue
        if name.endswith(("_open", "_request", "_response")) or "_error" in name:
            assert name in hooks, name


# ---------------------------------------------------------------------------
# Factory, source, actor
# ---------------------------------------------------------------------------


def test_factory_with_nothing_mounted_raises_bridge_error():
    with pytest.raises(ib.BridgeError):
        ib.OpenerFactory().opener_for()
    factory = ib.OpenerFactory({"api": _wsgi()})
    factory.unmount("api")
    with pytest.raises(ib.BridgeError):
        factory.opener_for()


@pytest.mark.parametrize("path", PATHS)
def test_factory_opener_tags_source_and_actor(path):
    kind, timeout = path
    seen = []

    def do_GET(self):
        seen.append((ib.current_source(), ib.current_actor()))
        _respond(self, body=b"h")

    def app(environ, start_response):
        seen.append((ib.current_source(), ib.current_actor()))
        seen.append((environ["inproc.source"], environ["inproc.actor"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"w"]

    app = _handler(do_GET=do_GET) if kind == "handler" else validator(app)
    factory = ib.OpenerFactory({"api": app})
    opener = factory.opener_for(actor="user-7", source=ib.SOURCE_AGENTS)
    with opener.open("inproc://api/", timeout=timeout) as resp:
        resp.read()
    assert set(seen) == {("agents", "user-7")}
    assert type(seen[0][0]) is ib.Source
    assert ib.current_source() is None and ib.current_actor() is None


def test_factory_openers_see_later_mounts_and_unmounts():
    factory = ib.OpenerFactory({"a": _wsgi(body=[b"a"])})
    opener = factory.opener_for()
    factory.mount("b", _wsgi(body=[b"b"]))
    with opener.open("inproc://b/") as resp:
        assert resp.read() == b"b"
    factory.unmount("a")
    with pytest.raises(urllib.error.URLError, match="'a'"):
        opener.open("inproc://a/")


def test_factory_openers_keep_their_own_source():
    seen = []

    def app(environ, start_response):
        seen.append(ib.current_source())
        start_response("204 No Content", [])
        return []

    factory = ib.OpenerFactory({"api": validator(app)})
    for source in ("one", "two", None):
        with factory.opener_for(source=source).open("inproc://api/") as resp:
            resp.read()
    assert seen == ["one", "two", None]


def test_factory_extra_handlers_join_the_opener():
    class Recorder(urllib.request.BaseHandler):
        def __init__(self):
            self.urls = []

        def http_request(self, req):
            self.urls.append(req.full_url)
            return req

    recorder = Recorder()
    opener = ib.OpenerFactory({"api": _wsgi()}).opener_for(recorder)
    with opener.open("inproc://api/x") as resp:
        resp.read()
    assert recorder.urls == ["inproc://api/x"]


def test_context_helpers_outside_a_request():
    assert ib.current_source() is None
    assert ib.current_actor() is None
    with pytest.raises(RuntimeError):
        ib.cancelled()


def test_source_cannot_be_set_by_a_header():
    seen = []

    def app(environ, start_response):
        seen.append((ib.current_source(), environ["inproc.source"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return []

    opener = _opener({"api": validator(app)}, source="real")
    forged = {"Source": "forged", "X-Inproc-Source": "f"}
    req = urllib.request.Request("inproc://api/", headers=forged)
    with opener.open(req) as resp:
        resp.read()
    assert seen == [("real", "real")]


# ---------------------------------------------------------------------------
# Mounting
# ---------------------------------------------------------------------------


def test_mount_unknown_name_raises_urlerror_naming_it():
    opener = _opener({"api": _wsgi()})
    with pytest.raises(urllib.error.URLError, match="nope"):
        opener.open("inproc://nope/")


def test_mount_names_match_case_insensitively():
    handler = ib.InProcHandler({"Api.Internal": _wsgi(body=[b"x"])})
    opener = urllib.request.build_opener(handler)
    with opener.open("inproc://API.internal/") as resp:
        assert resp.read() == b"x"
    handler.unmount("api.INTERNAL")
    with pytest.raises(KeyError):
        handler.unmount("api.internal")


def test_mount_rejects_what_is_not_an_app():
    handler = ib.InProcHandler()
    with pytest.raises(TypeError):
        handler.mount("api", 42)
    with pytest.raises(urllib.error.URLError):
        handler.mount("bad host/", _wsgi())
    with pytest.raises(KeyError):
        handler.unmount("never")


def test_mount_replace_is_atomic_for_requests_in_flight():
    entered, release = threading.Event(), threading.Event()

    def old(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        entered.set()
        yield b"o"
        release.wait(WAIT)
        yield b"ld"

    handler = ib.InProcHandler({"api": old})
    opener = urllib.request.build_opener(handler)
    with opener.open("inproc://api/", timeout=5) as first:
        assert entered.wait(WAIT)
        handler.mount("api", _wsgi(body=[b"new"]))
        with opener.open("inproc://api/") as second:
            assert second.read() == b"new"
        release.set()
        assert first.read() == b"old"


def test_mount_accepts_none_and_empty_apps():
    for apps in (None, {}):
        opener = _opener(apps)
        with pytest.raises(urllib.error.URLError):
            opener.open("inproc://api/")


# ---------------------------------------------------------------------------
# Status, headers, bodies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_status_reason_and_headers_pass_through(path):
    kind, timeout = path
    body = b"I'm a teapot, short and stout"

    def do_GET(self):
        _respond(self, 418, body, [("X-Tea", "earl grey"), ("X-Tea", "green")], "I'm a teapot")

    app = _wsgi("418 I'm a teapot", [("Content-Type", "text/plain"),
                                     ("X-Tea", "earl grey"), ("X-Tea", "green"),
                                     ("Content-Length", str(len(body)))], [body])
    opener = _opener({"api": _handler(do_GET=do_GET) if kind == "handler" else app})
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open("inproc://api/pot", timeout=timeout)
    err = info.value
    with err:
        assert err.code == 418 and err.reason == "I'm a teapot"
        assert err.headers.get_all("X-Tea") == ["earl grey", "green"]
        assert err.read() == body


@pytest.mark.parametrize("path", PATHS)
def test_response_surface_is_httpresponse(path):
    kind, timeout = path
    body = b"line one\nline two\nline three\n"

    def do_GET(self):
        _respond(self, 200, body, [("Content-Type", "text/plain")])

    app = _wsgi(headers=[("Content-Type", "text/plain")], body=[body[:9], body[9:]])
    opener = _opener({"api": _handler(do_GET=do_GET) if kind == "handler" else app})
    with opener.open("inproc://api/x?y=1", timeout=timeout) as resp:
        assert isinstance(resp, http.client.HTTPResponse)
        assert resp.status == resp.getcode() == 200 and resp.reason == "OK"
        assert resp.msg == "OK"  # urllib puts the reason there
        assert isinstance(resp.headers, http.client.HTTPMessage)
        assert resp.getheader("content-type") == resp.info()["Content-Type"] == "text/plain"
        assert resp.url == resp.geturl() == "inproc://api/x?y=1"
        assert resp.readline() == b"line one\n"
        assert resp.read1(4) == b"line"
        buf = bytearray(5)
        assert resp.readinto(buf) == 5 and bytes(buf) == b" two\n"
        assert list(resp) == [b"line three\n"]
        assert resp.read() == b""


@pytest.mark.parametrize("path", PATHS)
def test_no_body_for_head_204_304(path):
    kind, timeout = path

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()

    def do_GET(self):
        code = int(self.path[1:])
        self.send_response(code)
        self.end_headers()

    def app(environ, start_response):
        code = environ["PATH_INFO"][1:]
        start_response(code + " X", [("Content-Type", "text/plain"), ("Content-Length", "5")]
                       if code == "200" else [])
        return [b"hello"] if code == "200" else []

    handler = _handler(do_GET=do_GET, do_HEAD=do_HEAD)
    apps = {"api": handler if kind == "handler" else validator(app)}
    opener = _opener(apps)
    req = urllib.request.Request("inproc://api/200", method="HEAD")
    with opener.open(req, timeout=timeout) as resp:
        assert resp.status == 200 and resp.read() == b""
        assert resp.getheader("Content-Length") == "5"
    with opener.open("inproc://api/204", timeout=timeout) as resp:
        assert resp.status == 204 and resp.read() == b""
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open("inproc://api/304", timeout=timeout)
    with info.value as err:
        assert err.code == 304 and err.read() == b""


def test_handler_framings_are_decoded():
    payload = b"".join(b"%05d," % n for n in range(2000))

    class Chunked(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(payload), 3000):
                part = payload[start:start + 3000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

    class CloseDelimited(QuietHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            for start in range(0, len(payload), 777):
                self.wfile.write(payload[start:start + 777])

    class Continue(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            _respond(self, 200, body[::-1])

    opener = _opener({"chunked": Chunked, "close": CloseDelimited, "continue": Continue})
    for name in ("chunked", "close"):
        with opener.open("inproc://%s/" % name) as resp:
            assert resp.read() == payload
    expect = {"Expect": "100-continue"}
    req = urllib.request.Request("inproc://continue/", data=b"abc", headers=expect)
    with opener.open(req) as resp:
        assert resp.status == 200 and resp.read() == b"cba"


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------


def test_stream_handler_lockstep_sse():
    opened, read = threading.Event(), threading.Event()
    produced = []

    class SSE(QuietHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if not opened.wait(WAIT):
                return
            for n in range(5):
                produced.append(n)
                self.wfile.write(b"data: %d\n\n" % n)
                self.wfile.flush()
                if not read.wait(WAIT):
                    return
                read.clear()

    opener = _opener({"api": SSE})
    with opener.open("inproc://api/events") as resp:
        # open() returned on the header block, before any event was written.
        assert produced == []
        opened.set()
        for n in range(5):
            assert resp.readline() == b"data: %d\n" % n
            assert resp.readline() == b"\n"
            assert produced == list(range(n + 1))  # the next one waits for us
            read.set()
        assert resp.read() == b""


@pytest.mark.parametrize("timeout", WSGI_TIMEOUTS)
def test_stream_wsgi_lockstep_events(timeout):
    read = threading.Event()
    produced = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/x-ndjson")])
        for n in range(5):
            produced.append(n)
            yield b'{"n": %d}\n' % n
            if n < 4 and not read.wait(WAIT):
                return
            read.clear()

    opener = _opener({"api": validator(app)})
    with opener.open("inproc://api/", timeout=timeout) as resp:
        for n in range(5):
            assert resp.readline() == b'{"n": %d}\n' % n
            assert produced == list(range(n + 1))
            read.set()
        assert resp.read() == b""


def test_stream_flush_works_with_a_buffered_wfile():
    read = threading.Event()

    class Buffered(QuietHandler):
        wbufsize = 1 << 16  # a BufferedWriter: only flush() pushes bytes out

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"first\n")
            self.wfile.flush()
            read.wait(WAIT)
            self.wfile.write(b"second\n")

    with _opener({"api": Buffered}).open("inproc://api/") as resp:
        assert resp.readline() == b"first\n"
        read.set()
        assert resp.read() == b"second\n"


def test_stream_wfile_write_returns_byte_count():
    counts = []

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        counts.append(self.wfile.write(b"12345"))
        counts.append(self.wfile.write(memoryview(b"abc")))
        counts.append(self.wfile.write(b""))

    with _opener({"api": _handler(do_GET=do_GET)}).open("inproc://api/") as resp:
        assert resp.read() == b"12345abc"
    assert counts == [5, 3, 0]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_error_before_response_is_500_and_logged(path, caplog):
    kind, timeout = path

    def do_GET(self):
        raise ValueError("kaput")

    def app(environ, start_response):
        raise ValueError("kaput")

    opener = ib.OpenerFactory(
        {"api": _handler(do_GET=do_GET) if kind == "handler" else validator(app)}
    ).opener_for(source="billing")
    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open("inproc://api/", timeout=timeout)
        with info.value as err:
            assert err.code == 500
            assert err.read()
    records = [r for r in caplog.records if r.name == "inproc_bridge"]
    assert len(records) == 1
    assert "billing" in records[0].getMessage()
    assert records[0].exc_info[0] is ValueError


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
def test_error_after_headers_makes_handler_body_read_raise(framing, caplog):
    class Failing(QuietHandler):
        protocol_version = "HTTP/1.1" if framing == "chunked" else "HTTP/1.0"

        def do_GET(self):
            self.send_response(200)
            if framing == "content-length":
                self.send_header("Content-Length", "100")
            elif framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n" if framing == "chunked" else b"hello")
            raise ValueError("midway")

    opener = _opener({"api": Failing})
    for reader in ("read", "read_amt", "readline", "readinto"):
        with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"):
            with opener.open("inproc://api/") as resp:
                with pytest.raises((OSError, http.client.HTTPException)):
                    if reader == "read":
                        resp.read()
                    elif reader == "read_amt":
                        while resp.read(3):
                            pass
                    elif reader == "readline":
                        while resp.readline():
                            pass
                    else:
                        while resp.readinto(bytearray(4)):
                            pass


@pytest.mark.parametrize("timeout", WSGI_TIMEOUTS)
def test_error_after_first_chunk_makes_wsgi_body_read_raise(timeout, caplog):
    closed = []

    class Body:
        def __iter__(self):
            yield b"first"
            raise ValueError("midway")

        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"):
        with _opener({"api": validator(app)}).open("inproc://api/", timeout=timeout) as resp:
            with pytest.raises(ConnectionResetError, match="midway"):
                while resp.read(2):
                    pass
    assert closed == [True]


@pytest.mark.parametrize("timeout", WSGI_TIMEOUTS)
def test_error_wsgi_short_content_length_raises(timeout):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        return [b"abc", b"de"]

    opener = _opener({"api": validator(app)})
    for amt in (None, 4):
        with opener.open("inproc://api/", timeout=timeout) as resp:
            with pytest.raises(http.client.IncompleteRead):
                while resp.read(amt):
                    pass


def test_error_handler_returning_without_response_is_200_empty():
    def do_GET(self):
        pass

    with _opener({"api": _handler(do_GET=do_GET)}).open("inproc://api/") as resp:
        assert resp.status == 200 and resp.read() == b""


@pytest.mark.parametrize("timeout", WSGI_TIMEOUTS)
def test_error_wsgi_without_start_response_is_500(timeout, caplog):
    def app(environ, start_response):
        return []

    with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"):
        with pytest.raises(urllib.error.HTTPError) as info:
            _opener({"api": app}).open("inproc://api/", timeout=timeout)
    with info.value as err:
        assert err.code == 500


def test_error_send_error_reaches_the_caller():
    def do_GET(self):
        self.send_error(404, "No such thing", "explained")

    with pytest.raises(urllib.error.HTTPError) as info:
        _opener({"api": _handler(do_GET=do_GET)}).open("inproc://api/")
    with info.value as err:
        assert err.code == 404 and err.reason == "No such thing"
        assert b"explained" in err.read()


# ---------------------------------------------------------------------------
# Timeouts and cancellation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["handler", "wsgi"])
def test_timeout_before_headers_raises_socket_timeout(kind):
    release, outcome = threading.Event(), []

    def serve_slowly():
        release.wait(WAIT)
        outcome.append(ib.cancelled().is_set())

    def do_GET(self):
        serve_slowly()
        try:
            _respond(self, body=b"late")
        except BrokenPipeError:
            outcome.append("broken pipe")

    def app(environ, start_response):
        serve_slowly()
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"late"
        outcome.append("not reached")

    opener = _opener({"api": _handler(do_GET=do_GET) if kind == "handler" else validator(app)})
    started = time.monotonic()
    with pytest.raises(socket.timeout) as info:
        opener.open("inproc://api/", timeout=0.2)
    assert not isinstance(info.value, urllib.error.URLError)  # as urllib raises it over TCP
    assert time.monotonic() - started < 5
    release.set()
    deadline = time.monotonic() + WAIT
    while len(outcome) < (2 if kind == "handler" else 1) and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert outcome[0] is True
    if kind == "handler":
        assert outcome[1] == "broken pipe"


@pytest.mark.parametrize("kind", ["handler", "wsgi"])
def test_timeout_between_chunks_raises_from_read(kind):
    release = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"first\n")
        release.wait(WAIT)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first\n"
        release.wait(WAIT)

    opener = _opener({"api": _handler(do_GET=do_GET) if kind == "handler" else validator(app)})
    try:
        with opener.open("inproc://api/", timeout=0.2) as resp:
            assert resp.readline() == b"first\n"
            with pytest.raises(socket.timeout):
                resp.readline()
    finally:
        release.set()


@pytest.mark.parametrize("path", PATHS)
def test_caller_close_sets_cancelled_and_next_write_fails(path):
    kind, timeout = path
    seen, done = [], threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"x" * 4096)
        except BrokenPipeError:
            seen.append(ib.cancelled().is_set())
        finally:
            seen.append(threading.get_ident())
            done.set()

    class Endless:
        def __init__(self):
            self.event = ib.cancelled()

        def __iter__(self):
            while True:
                yield b"x" * 4096

        def close(self):
            seen.append(self.event.is_set())
            seen.append(threading.get_ident())
            done.set()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Endless()

    opener = _opener({"api": _handler(do_GET=do_GET) if kind == "handler" else validator(app)})
    resp = opener.open("inproc://api/", timeout=timeout)
    assert len(resp.read(10000)) == 10000
    resp.close()
    assert done.wait(WAIT)
    assert seen[0] is True
    if kind == "handler" or timeout:
        # The worker that ran it goes back to the pool, free for the next request.
        deadline = time.monotonic() + WAIT
        while seen[1] not in ib._workers.idle():
            assert time.monotonic() < deadline, "the worker did not return to the pool"
            threading.Event().wait(0.01)


def test_cancelled_is_the_same_event_for_a_request():
    events = []

    def app(environ, start_response):
        events.append(ib.cancelled())
        events.append(ib.cancelled())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return []

    with _opener({"api": app}).open("inproc://api/") as resp:
        resp.read()
    assert events[0] is events[1]


def test_unclosed_response_warns_and_releases_the_app():
    closed = threading.Event()

    class Body:
        def __iter__(self):
            yield b"a"
            yield b"b"

        def close(self):
            closed.set()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    opener = _opener({"api": app})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resp = opener.open("inproc://api/")
        del resp
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert closed.is_set()


# ---------------------------------------------------------------------------
# Concurrency, context, nesting, the caller's Request
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_parallel_requests_echo_their_own_payload(path):
    kind, timeout = path

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _respond(self, body=body)

    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body[i:i + 100] for i in range(0, len(body), 100)]

    opener = _opener({"api": _handler(do_POST=do_POST) if kind == "handler" else validator(app)})
    results, errors = {}, []

    def one(n):
        payload = (b"%d-" % n) * (200 + n * 37)
        try:
            with opener.open("inproc://api/", data=payload, timeout=timeout) as resp:
                results[n] = resp.read() == payload
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not errors
    assert results == dict.fromkeys(range(24), True)


@pytest.mark.parametrize("path", PATHS)
def test_context_vars_reach_the_app_and_do_not_leak_back(path):
    kind, timeout = path
    var = contextvars.ContextVar("var", default="unset")
    seen = []

    def do_GET(self):
        seen.append(var.get())
        var.set("changed by app")
        _respond(self)

    def app(environ, start_response):
        seen.append(var.get())
        var.set("changed by app")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return []

    opener = _opener({"api": _handler(do_GET=do_GET) if kind == "handler" else validator(app)})
    var.set("caller")
    with opener.open("inproc://api/", timeout=timeout) as resp:
        resp.read()
    assert seen == ["caller"]
    assert var.get() == "caller"


@pytest.mark.parametrize("path", PATHS)
def test_nested_calls_from_inside_an_app(path):
    kind, timeout = path
    handler = ib.InProcHandler(source="outer")
    opener = urllib.request.build_opener(handler)

    def inner_body(depth):
        if depth == 0:
            return b"bottom:%s" % str(ib.current_source()).encode()
        with opener.open("inproc://api/%d" % (depth - 1), timeout=timeout) as resp:
            return b"%d>" % depth + resp.read()

    def do_GET(self):
        _respond(self, body=inner_body(int(self.path[1:])))

    def app(environ, start_response):
        body = inner_body(int(environ["PATH_INFO"][1:]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    handler.mount("api", _handler(do_GET=do_GET) if kind == "handler" else validator(app))
    with opener.open("inproc://api/6", timeout=timeout) as resp:
        assert resp.read() == b"6>5>4>3>2>1>bottom:outer"


@pytest.mark.parametrize("size", [10, 70000, 3 << 20])
@pytest.mark.parametrize("shape", ["bytes", "file", "iterable"])
def test_handler_request_bodies_small_and_streamed(size, shape):
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    class Echo(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            if self.headers["Transfer-Encoding"] == "chunked":
                body = b""
                while True:
                    n = int(self.rfile.readline(), 16)
                    body += self.rfile.read(n)
                    self.rfile.readline()
                    if not n:
                        break
            else:
                body = self.rfile.read(int(self.headers["Content-Length"]))
            digest = b"%d:%d" % (len(body), body == payload)
            _respond(self, 200, digest)

    if shape == "bytes":
        data = payload
    elif shape == "file":
        data = io.BytesIO(payload)
    else:
        data = (payload[i:i + 50000] for i in range(0, len(payload), 50000))
    with _opener({"api": Echo}).open("inproc://api/", data=data, timeout=10) as resp:
        assert resp.read() == b"%d:1" % size


def test_the_callers_request_object_is_untouched_by_the_app():
    def do_POST(self):
        self.headers["X-Added"] = "by app"
        self.rfile.read(int(self.headers["Content-Length"]))
        _respond(self, body=b"ok", headers=[("Set-Cookie", "a=b")])

    opener = _opener({"api": _handler(do_POST=do_POST)})
    req = urllib.request.Request("inproc://api/", data=b"payload", headers={"X-Mine": "1"})
    with opener.open(req) as resp:
        resp.read()
    assert req.data == b"payload"
    assert req.headers == {"X-mine": "1"}
    assert not req.has_header("X-added")
    assert req.get_full_url() == "inproc://api/"


def test_handler_life_cycle_is_the_real_one():
    server = object()
    seen = {}

    class Custom(QuietHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            seen["setup"] = True
            super().setup()

        def handle(self):
            seen["handle"] = True
            super().handle()

        def finish(self):
            seen["finish"] = True
            super().finish()

        def do_PUT(self):
            seen.update(
                server=self.server,
                client=self.client_address,
                same_socket=self.request is self.connection,
                command=self.command,
                path=self.path,
                version=self.request_version,
                host=self.headers["Host"],
                agent=self.headers["User-Agent"],
                body=self.rfile.read(int(self.headers["Content-Length"])),
            )
            _respond(self, 201, b"made")

    handler = ib.InProcHandler()
    handler.mount("api", Custom, server=server)
    req = urllib.request.Request("inproc://api/a/b?c=d", data=b"xyz", method="PUT")
    with urllib.request.build_opener(handler).open(req) as resp:
        assert resp.status == 201 and resp.read() == b"made"
    assert seen["setup"] and seen["handle"] and seen["finish"]
    assert seen["server"] is server
    assert seen["client"] == ("127.0.0.1", 0)
    assert seen["same_socket"] and seen["command"] == "PUT" and seen["path"] == "/a/b?c=d"
    assert seen["version"] == "HTTP/1.1" and seen["host"] == "api"
    assert seen["agent"].startswith("Python-urllib/") and seen["body"] == b"xyz"


def test_handler_partial_serves_a_directory(tmp_path):
    (tmp_path / "hello.txt").write_bytes(b"hello file")
    app = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    opener = _opener({"files": app})
    with opener.open("inproc://files/hello.txt") as resp:
        assert resp.read() == b"hello file"


def test_wsgi_environ_is_what_a_server_builds():
    seen = {}

    def app(environ, start_response):
        seen.update(environ)
        seen["body"] = _read_input(environ["wsgi.input"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return []

    os.environ["INPROC_SECRET_TEST"] = "x"
    try:
        req = urllib.request.Request("inproc://API:8080/caf%C3%A9/x?q=%20a&b", data=b"d=1",
                                     headers={"X-Thing": "1", "X_Under": "dropped"})
        with _opener({"api:8080": validator(app)}).open(req) as resp:
            resp.read()
    finally:
        del os.environ["INPROC_SECRET_TEST"]
    assert seen["REQUEST_METHOD"] == "POST" and seen["SCRIPT_NAME"] == ""
    assert seen["PATH_INFO"] == "/caf\u00c3\u00a9/x"
    assert seen["QUERY_STRING"] == "q=%20a&b"
    assert seen["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert seen["CONTENT_LENGTH"] == "3" and seen["body"] == b"d=1"
    assert seen["SERVER_NAME"] == "api" and seen["SERVER_PORT"] == "8080"
    assert seen["SERVER_PROTOCOL"] == "HTTP/1.1" and seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["HTTP_HOST"] == "API:8080" and seen["HTTP_X_THING"] == "1"
    assert "HTTP_X_UNDER" not in seen and "INPROC_SECRET_TEST" not in seen
    assert seen["wsgi.url_scheme"] == "http" and seen["wsgi.input_terminated"] is True
    assert seen["wsgi.multithread"] is True and seen["wsgi.multiprocess"] is False


@pytest.mark.parametrize("timeout", WSGI_TIMEOUTS)
def test_wsgi_chunked_request_body_reads_to_eof(timeout):
    seen = {}

    def app(environ, start_response):
        seen["length"] = environ.get("CONTENT_LENGTH")
        seen["body"] = _read_input(environ["wsgi.input"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % len(seen["body"])]

    chunks = [b"a" * 1000, b"b" * 10, b"", b"c" * 5000]
    opener = _opener({"api": validator(app)})
    with opener.open("inproc://api/", data=iter(chunks), timeout=timeout) as resp:
        assert resp.read() == b"6010"
    assert seen["length"] is None and seen["body"] == b"".join(chunks)


# ---------------------------------------------------------------------------
# BodyPipe
# ---------------------------------------------------------------------------


def test_pipe_passes_bytes_in_order_and_ends_with_eof():
    pipe = ib.BodyPipe()
    assert pipe.write(b"abc") == 3
    assert pipe.write(b"") == 0  # not the end
    assert pipe.write(bytearray(b"de")) == 2
    pipe.close_writer()
    assert pipe.read(2) == b"ab"
    assert pipe.read() == b"cde"
    assert pipe.read(10) == b""
    pipe.close()
    pipe.close()  # idempotent
    assert pipe.closed


def test_pipe_copies_mutable_buffers_and_shares_bytes():
    pipe = ib.BodyPipe()
    buf = bytearray(b"xyz")
    pipe.write(buf)
    buf[:] = b"!!!"
    pipe.close_writer()
    assert pipe.read() == b"xyz"


def test_pipe_backpressure_blocks_a_fast_writer():
    pipe = ib.BodyPipe(limit=10)
    blocked_write_done = threading.Event()
    pipe.write(b"0123456789")

    def writer():
        pipe.write(b"more")
        blocked_write_done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not blocked_write_done.wait(0.05)  # full: the writer waits
    assert pipe.read(10) == b"0123456789"
    assert blocked_write_done.wait(WAIT)
    thread.join(WAIT)
    assert pipe.read(4) == b"more"
    pipe.close()


def test_pipe_reader_close_breaks_a_blocked_writer():
    pipe = ib.BodyPipe(limit=4)
    pipe.write(b"full")
    errors = []

    def writer():
        try:
            pipe.write(b"blocked")
        except BrokenPipeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    pipe.close()
    thread.join(WAIT)
    assert not thread.is_alive() and len(errors) == 1
    with pytest.raises(BrokenPipeError):
        pipe.write(b"again")
    pipe.close_writer()  # a no-op once the reader is gone


def test_pipe_read_timeout_raises_socket_timeout_then_refuses():
    pipe = ib.BodyPipe(read_timeout=0.05)
    with pytest.raises(socket.timeout):
        pipe.read(1)
    with pytest.raises(OSError):
        pipe.read(1)
    pipe.close()


def test_pipe_write_timeout_raises_socket_timeout():
    pipe = ib.BodyPipe(limit=1, write_timeout=0.05)
    pipe.write(b"x")
    with pytest.raises(socket.timeout):
        pipe.write(b"y")
    pipe.close()


def test_pipe_writer_error_arrives_after_the_bytes_before_it():
    pipe = ib.BodyPipe()
    pipe.write(b"partial")
    pipe.close_writer(ConnectionResetError("app died"))
    assert pipe.read(7) == b"partial"
    with pytest.raises(ConnectionResetError, match="app died"):
        pipe.read(1)
    pipe.close()


def test_pipe_streams_between_threads():
    pipe = ib.BodyPipe(limit=1000)
    chunks = [bytes([n % 256]) * (n * 7 % 1500 + 1) for n in range(500)]

    def writer():
        for chunk in chunks:
            pipe.write(chunk)
        pipe.close_writer()

    thread = threading.Thread(target=writer)
    thread.start()
    got = io.BufferedReader(pipe).read()
    thread.join(WAIT)
    assert got == b"".join(chunks)
    pipe.close()


def test_pipe_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ib.BodyPipe(limit=0)
    pipe = ib.BodyPipe()
    with pytest.raises(TypeError):
        pipe.write("text")
    pipe.close_writer()
    with pytest.raises(ValueError):
        pipe.write(b"after the end")
    pipe.close()


# ---------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------


def test_selftest_passes(capsys):
    assert ib.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "%d passed, 0 failed" % (len(out) - 2)


# ---------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------


def _readme_examples():
    import re

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.rst")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text, re.M)
    return [
        pytest.param("\n".join(line[4:] for line in block.splitlines()), id="example%d" % n)
        for n, block in enumerate(blocks, 1)
    ]


@pytest.mark.parametrize("source", _readme_examples())
def test_readme_example_runs(source):
    exec(compile(source, "README.rst", "exec"), {"__name__": "readme_example"})


def test_readme_has_examples():
    assert len(_readme_examples()) >= 5
