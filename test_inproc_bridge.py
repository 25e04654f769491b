"""Tests for inproc_bridge.  Run: python -m pytest -W error test_inproc_bridge.py"""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import contextvars
import email.utils
import errno
import functools
import gc
import hashlib
import hmac
import http.client
import http.cookiejar
import http.server
import importlib
import inspect
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import re
import select
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
import types
import urllib.error
import urllib.parse
import urllib.request
import warnings
import wsgiref.handlers
import wsgiref.simple_server
import wsgiref.util
import wsgiref.validate
import xmlrpc.client
import xmlrpc.server
import zlib
from wsgiref.validate import validator

import pytest

import inproc_bridge as ib


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------
# One WAIT for every test; the constants of the reliability tests after it.
WAIT = 10.0  # seconds any wait for an event may take before the test calls it a hang
APP_KINDS = ("handler", "wsgi-inline", "wsgi-worker", "asgi")
KIND_TIMEOUT = {"handler": 5.0, "wsgi-inline": None, "wsgi-worker": 5.0, "asgi": 5.0}
SYNC_KINDS = APP_KINDS[:3]  # the kinds that are not ASGI
WSGI_KINDS = APP_KINDS[1:3]
# Every kind, heavy on the kinds that are not ASGI (their cases cost more).
HEAVY_ON_SYNC_KINDS = [*(pytest.param(k, marks=pytest.mark.heavy) for k in SYNC_KINDS), "asgi"]
_USER, _PASS, _REALM = "alice", "s3cret", "d-realm"
_NONCE, _OPAQUE = "d-nonce-5f2a", "d-opaque-77"
_SPOOF = {"Source": "billing", "X-Inproc-Source": "billing", "X-Inproc-Actor": "root",
          "Actor": "root"}
#: Watchdog for one whole exchange run in a client thread.
WATCHDOG = 30.0
#: What a caller may see instead of its bytes: never a silent short body.
ALLOWED = (http.client.HTTPException, OSError)
FIRST = b"first|"
MIB = 1 << 20
#: Random bytes the random tests cut their bodies from.
SOURCE = hashlib.shake_256(b"inproc_bridge reliability").digest(2 * MIB)
PIECE = 64 * 1024
BIG = 200 * MIB
MEMORY_BOUND = 8 * MIB
FAULT_SIZES = (0, 1, 2, 7, 100, 1000, 4096, 8192, 65536, 300000)
READ_SIZES = (1, 5, 100, 4096, 65536, MIB)
READ_KINDS = ("read", "read1", "readinto", "readline", "readall")
STALL_TIMEOUT = 0.25
#: Seeds 0..QUICK_SEEDS-1 run always, the rest with the heavy tests.
QUICK_SEEDS, ALL_SEEDS = 12, 150
FAULT_SEEDS = [*range(QUICK_SEEDS),
               *(pytest.param(seed, marks=pytest.mark.heavy)
                 for seed in range(QUICK_SEEDS, ALL_SEEDS))]
ASGI_FAULT_SIZES = (0, 0, 1, 2, 7, 100, 1000, 4096, 65536, 300000)
FLOOD = 1500000
#: Seeds 0..ASGI_QUICK_SEEDS-1 run always, the rest with the heavy tests.
ASGI_QUICK_SEEDS, ASGI_ALL_SEEDS = 8, 200
LEAK_BOUND = 128 * 1024
# fork: the parent serves one request of the kind first (on the worker paths
# until its worker is idle in the pool); each child arms a watchdog that calls
# os._exit(99) after WAIT seconds, and the parent kills it after WAIT + 5.  A
# response open mid-stream in the parent is opened with no timeout, so a
# socket.timeout cannot pass for the prompt error the child must see.
# Request bodies once open() has left: an app may still read the bytes the
# caller handed over before (over TCP they would sit in the socket buffer),
# then an error; never a clean EOF short of the body, never a byte pulled from
# the caller afterwards; every pull happens on the caller's thread.
# Failing WSGI results are not wrapped in wsgiref.validate: its IteratorWrapper
# hides __len__ and, when iter() fails, keeps the result from the bridge.
_ERROR_BODY = b"A server error occurred.  Please contact the administrator."
_FORK_STARTS = [
    pytest.param("os.fork", marks=pytest.mark.skipif(
        not hasattr(os, "fork"), reason="needs os.fork")),
    pytest.param("multiprocessing", marks=pytest.mark.skipif(
        "fork" not in multiprocessing.get_all_start_methods(),
        reason="needs multiprocessing's fork start method")),
]
# Headers the comparisons leave out: set by the server itself, or hop-by-hop framing.
_NOT_COMPARED = frozenset(("date", "server", "connection", "keep-alive", "transfer-encoding",
                           "te", "trailer", "trailers", "upgrade", "proxy-authenticate",
                           "proxy-authorization"))
# Header values a server sends as given and http.client reshapes when it parses them.
_TRICKY_HEADERS = [
    ("X-Lead", "  lead"),
    ("X-Trail", "trail  "),
    ("X-Both", " both "),
    ("X-Obs", " caf\xe9 "),  # obs-text: a latin-1 character
    ("X-Empty", ""),
    ("X-Spaces", "   "),
    ("X-Inner", "a  b"),
    ("X-Many", " one"),
    ("X-Many", "two "),
    # What Django's c.output(header="") gives: a leading space.
    ("Set-Cookie", " csrftoken=abc123; Path=/; SameSite=Lax"),
    ("Set-Cookie", " sessionid=s3cr3t; HttpOnly; Path=/ "),
]
_TAB_HEADERS = [
    ("X-Tab-Lead", "\ttab"),
    ("X-Tab-Trail", "tab\t"),
    ("X-Tab-Mixed", " \t mixed \t "),
    ("X-Tab-Only", "\t"),
]


# ---------------------------------------------------------------------------
# App kinds: one app, every kind
# ---------------------------------------------------------------------------
# A behaviour every app kind shares runs on the four paths: a handler class,
# a WSGI app in the caller's thread (no timeout), a WSGI app on a worker (a
# timeout) and an ASGI app.  make_app() builds the same app for each kind from
# one plain function, logic(req) -> (status, headers, chunks): req is a
# KindRequest (the request as that kind of app receives it); status an int or
# "code reason"; chunks is iterated lazily, each chunk sent (and flushed) as
# the kind sends a body part, and closed (if it can be) when the app ends.


@pytest.fixture(params=APP_KINDS)
def app_kind(request):
    """One of the four paths; see make_app() and serve_kind()."""
    return request.param


@pytest.fixture
def kind_timeout(app_kind):
    """The timeout that selects ``app_kind``'s path (None: WSGI in the caller's thread)."""
    return KIND_TIMEOUT[app_kind]


@pytest.fixture
def route_app(app_kind):
    """(factory of the routing app for ``app_kind``, its timeout)."""
    return (lambda calls: make_app(app_kind, _route_logic(calls))), KIND_TIMEOUT[app_kind]


class KindRequest:
    """What make_app() hands its logic.  ``target``: path and query as the app
    got them (WSGI: PATH_INFO, decoded); ``path``: the path decoded (latin-1);
    ``query``; ``headers``: an HTTPMessage; ``tags``: (source, actor) from the
    environ or the scope's inproc extension (None for a handler class);
    ``read(n)``: the body, decoded, b"" at its end; ``rfile``: the raw stream
    (a handler's rfile, framing and all; wsgi.input; ASGI: a reader whose
    read() raises ConnectionResetError at http.disconnect); ``body``: the
    whole (rest of the) body."""

    def __init__(self, method, target, headers, read, rfile=None, path=None, tags=None):
        self.method, self.target, self.headers, self.read = method, target, headers, read
        raw, _, self.query = target.partition("?")
        self.path = urllib.parse.unquote(raw, "iso-8859-1") if path is None else path
        self.rfile, self.tags, self.messages = rfile, tags, 0

    @functools.cached_property
    def body(self):
        parts = []
        while True:
            data = self.read(PIECE)
            if not data:
                return b"".join(parts)
            parts.append(data)


_KIND_END = object()


def _dechunked(rfile):
    """read(n) of the chunked body in ``rfile``, decoded: b"" at its end."""
    state = {"left": 0, "done": False}

    def read(n=-1):
        while not state["left"]:
            if state["done"]:
                return b""
            size = int(rfile.readline(1024).split(b";")[0].strip(), 16)
            if size == 0:
                while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                state["done"] = True
                return b""
            state["left"] = size
        data = rfile.read(state["left"] if n is None or n < 0 else min(n, state["left"]))
        if not data:
            raise AppFault("request body ended inside a chunk")
        state["left"] -= len(data)
        if not state["left"]:
            assert rfile.read(2) == b"\r\n"
        return data

    return read


def _sized(rfile, length):
    """read(n) of a ``length``-byte body in ``rfile``: b"" at its end."""
    left = [length]

    def read(n=-1):
        want = left[0] if n is None or n < 0 else min(n, left[0])
        data = rfile.read(want) if want else b""
        left[0] -= len(data)
        return data

    return read


def _asgi_reader(req, receive, loop):
    """req.read for an ASGI app whose logic runs off the loop: pulls receive()."""
    pending, ended = bytearray(), []

    def read(n=-1):
        while not pending and not ended:
            future = asyncio.run_coroutine_threadsafe(receive(), loop)
            try:
                message = future.result(WAIT)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise RuntimeError("receive() did not answer in %s seconds" % WAIT) from None
            if message["type"] == "http.disconnect":
                raise ConnectionResetError(errno.ECONNRESET, "http.disconnect")
            req.messages += 1
            pending.extend(message.get("body", b""))
            if not message.get("more_body"):
                ended.append(True)
        data = bytes(pending if n is None or n < 0 else pending[:n])
        del pending[:len(data)]
        return data

    return read


def _status(status):
    """(code, reason) of a logic's status: an int or "code reason"."""
    if isinstance(status, int):
        return status, http.client.responses.get(status, "Unknown")
    code, _, reason = status.partition(" ")
    return int(code), reason


def make_app(kind, logic, probe=None, stream=False):
    """The app ``logic`` describes, as an app of ``kind`` (an APP_KINDS value).

    ``probe`` (a Probe) counts the app's start and its end (a handler's
    finish(), a WSGI result's close(), the ASGI call's return) and notes each
    OSError sending a body part raised ("write-error").  ``stream``: nothing
    of the body is read before ``logic`` runs, which reads what it wants (on
    ASGI it then runs on an executor thread, not on the loop).  Without it an
    ASGI app told the caller left while it reads the body notes
    ("disconnect", True) and does not answer."""

    def note(exc):
        if probe is not None and isinstance(exc, OSError):
            probe.note("write-error", type(exc))

    if kind == "handler":

        def serve(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                read = _dechunked(self.rfile)
            else:
                read = _sized(self.rfile, int(self.headers.get("Content-Length") or 0))
            req = KindRequest(self.command, self.path, self.headers, read, self.rfile)
            if not stream:
                req.body  # noqa: B018 - read before logic runs
            status, headers, chunks = logic(req)
            code, reason = _status(status)
            names = {name.lower() for name, _ in headers}
            chunked = "content-length" not in names and code >= 200 and code not in (204, 304)
            try:
                self.send_response(code, reason)
                for name, value in headers:
                    self.send_header(name, value)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                # With a Content-Length the logic's body goes out as it is, HEAD or not.
                for chunk in chunks:
                    if chunk and not (chunked and self.command == "HEAD"):
                        self.wfile.write(_chunk(chunk) if chunked else chunk)
                        self.wfile.flush()
                if chunked and self.command != "HEAD":
                    self.wfile.write(b"0\r\n\r\n")
            except OSError as exc:
                note(exc)
                raise
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        methods = {"do_" + m: serve for m in ("GET", "POST", "PUT", "HEAD", "DELETE", "PATCH")}
        return type("KindHandler", (ProbedHandler,),
                    dict(methods, protocol_version="HTTP/1.1", app_probe=probe))
    if kind in ("wsgi-inline", "wsgi-worker"):

        def wsgi_app(environ, start_response):
            target = environ["PATH_INFO"] + (
                "?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
            headers = http.client.HTTPMessage()
            for key, value in environ.items():
                if key.startswith("HTTP_"):
                    headers[key[5:].replace("_", "-").title()] = value
            # wsgiref invents CONTENT_TYPE 'text/plain' for a request without
            # one: only a content type that came with a body counts.
            if environ.get("CONTENT_LENGTH"):
                headers["Content-Length"] = environ["CONTENT_LENGTH"]
                if environ.get("CONTENT_TYPE"):
                    headers["Content-Type"] = environ["CONTENT_TYPE"]
            stream_in = environ["wsgi.input"]
            req = KindRequest(environ["REQUEST_METHOD"], target, headers,
                              io.BytesIO(_read_input(environ)).read if not stream
                              else stream_in.read, stream_in, environ["PATH_INFO"],
                              (environ.get("inproc.source"), environ.get("inproc.actor")))
            status, out, chunks = logic(req)
            start_response("%d %s" % _status(status), list(out))
            return chunks

        return validator(wsgi_app) if probe is None else _tracked_wsgi(wsgi_app, probe)
    if kind == "asgi":

        async def asgi_app(scope, receive, send):
            if scope["type"] != "http":
                raise ValueError("http only")
            if probe is not None:
                probe.start()
            try:
                await serve_asgi(scope, receive, send)
            finally:
                if probe is not None:
                    probe.finish()

        async def serve_asgi(scope, receive, send):
            headers = http.client.HTTPMessage()
            for name, value in scope["headers"]:
                headers[name.decode("latin-1")] = value.decode("latin-1")
            target = scope["raw_path"].decode("latin-1") + (
                "?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
            tags = scope.get("extensions", {}).get("inproc", {})
            loop = asyncio.get_running_loop()
            ctx = contextvars.copy_context()
            req = KindRequest(scope["method"], target, headers, None,
                              tags=(tags.get("source"), tags.get("actor")))
            if stream:
                req.read = _asgi_reader(req, receive, loop)
                req.rfile = types.SimpleNamespace(read=req.read)
                status, out, chunks = await loop.run_in_executor(None, ctx.run, logic, req)
            else:
                parts = []
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        if probe is not None:
                            probe.note("disconnect", True)
                        return
                    req.messages += 1
                    parts.append(message.get("body", b""))
                    if not message.get("more_body"):
                        break
                req.read = io.BytesIO(b"".join(parts)).read
                status, out, chunks = logic(req)

            async def send_part(message):
                try:
                    await send(message)
                except OSError as exc:
                    note(exc)
                    raise

            await send_part({"type": "http.response.start", "status": _status(status)[0],
                             "headers": [(n.encode("latin-1"), v.encode("latin-1"))
                                         for n, v in out]})
            # The logic's chunks may block (they wait on test events): take
            # each on an executor thread, in the request's context, so the
            # loop goes on serving; a list's are taken on the loop.
            iterator = iter(chunks)
            try:
                while True:
                    chunk = next(iterator, _KIND_END) if isinstance(chunks, list) else (
                        await loop.run_in_executor(None, ctx.run, next, iterator, _KIND_END))
                    if chunk is _KIND_END:
                        break
                    await send_part({"type": "http.response.body", "body": chunk,
                                     "more_body": True})
                await send_part({"type": "http.response.body", "body": b""})
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        return asgi_app
    raise ValueError("unknown app kind %r" % (kind,))


@contextlib.contextmanager
def serve_kind(kind, logic, name="app", **handler_kwargs):
    """An opener over a fresh InProcHandler serving make_app(kind, logic) as
    ``name``, and the timeout that selects the kind's path; the handler is
    closed (its ASGI loop stopped) afterwards."""
    with Bridge({name: make_app(kind, logic)}, **handler_kwargs) as (opener, _):
        yield opener, KIND_TIMEOUT[kind]


def _answer(status=200, headers=(("Content-Type", "text/plain"),), body=b""):
    """logic for make_app(): answer ``body`` whatever the request."""
    return lambda req: (status, list(headers), [body])


def _never_called(req):  # pragma: no cover - must not run
    raise AssertionError("the app ran for a request that should have been refused")


# ---------------------------------------------------------------------------
# Apps and openers
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


async def _send(send, body=b"", status=200, headers=(), more=False):
    """An ASGI response head and one body message (``more``: not the last)."""
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body, **({"more_body": True} if more
                                                                else {})})


def _opener(apps, **kwargs):
    return urllib.request.build_opener(ib.InProcHandler(apps, **kwargs))


def _https_handlers(opener):
    return [h for h in opener.handlers if isinstance(h, urllib.request.HTTPSHandler)]


def _tls_settings(context):
    """What decides how a TLS connection is made, comparable between contexts."""
    if context is None:
        return None
    return (context.verify_mode, context.check_hostname, context.options,
            context.minimum_version, context.maximum_version, context.verify_flags,
            getattr(context, "post_handshake_auth", None), context.protocol,
            len(context.get_ca_certs()))


def _read_input(environ):
    """Read the request body as a careful app does: to EOF only where the
    server promises ``wsgi.input_terminated`` (wsgiref does not)."""
    stream = environ["wsgi.input"]
    if not environ.get("wsgi.input_terminated"):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        return stream.read(length) if length else b""
    parts = []
    while True:
        chunk = stream.read(8192)  # the validator wants exactly one argument
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def _timeout_for(app_kind):
    """The timeout that selects the path: WSGI timeout=None runs inline."""
    return 5 if app_kind == "wsgi-worker" else None


def _chunk(data):
    """One chunk of a chunked body, as a handler class writes it itself."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class ProbedHandler(QuietHandler):
    """A quiet handler class that reports the end of its life cycle."""

    app_probe = None

    def setup(self):
        if self.app_probe is not None:
            self.app_probe.start()
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            if self.app_probe is not None:
                self.app_probe.finish()


class _ClosingResult:
    """A WSGI iterable with close(): closes what it wraps, runs ``on_close``
    and reports to the probe."""

    def __init__(self, iterable, probe, on_close=None):
        self._source = iterable
        self._it = iter(iterable)
        self._probe = probe
        self._on_close = on_close

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        try:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
            if self._on_close is not None:
                self._on_close()
        finally:
            self._probe.finish()


def _probed(probe):
    """A decorator for an ASGI http app: ``probe`` counts its start and its
    finish, whatever ends it."""

    def wrap(app):
        @functools.wraps(app)
        async def probed(scope, receive, send):
            assert scope["type"] == "http"
            probe.start()
            try:
                await app(scope, receive, send)
            finally:
                probe.finish()

        return probed

    return wrap


def _tracked_wsgi(app, probe, on_close=None):
    """``app`` under wsgiref's validator, its result tracked by ``probe``."""

    def tracked(environ, start_response):
        probe.start()
        try:
            result = app(environ, start_response)
        except BaseException:
            probe.finish()
            raise
        return _ClosingResult(result, probe, on_close)

    return validator(tracked)


def _streamed(body):
    """logic for make_app(): 200 and the chunks of ``body(target)``."""
    return lambda req: (200, [("Content-Type", "application/octet-stream")], body(req.target))


def _abandon_body(app_kind, probe, flood=False):
    """The body of an app its caller abandons after the first chunk.  It
    either waits (on a worker) to learn that the caller is gone and then
    writes once more, or floods: writes without pause, so on a worker it is
    blocked on a full pipe when the caller leaves."""

    def body(target):
        try:
            yield FIRST
            if flood:
                while True:
                    yield b"f" * PIECE
            if app_kind != "wsgi-inline":
                probe.note("cancelled", ib.cancelled().wait(WAIT))
            yield b"next|"
            probe.note("survived-write")
            while True:
                yield b"more|"
        except GeneratorExit:
            probe.note("generator-exit", ib.cancelled().is_set())
            raise

    return body


def _length_app(app_kind, probe, declared, body):
    """An app that declares ``declared`` as Content-Length and sends ``body``
    (an app bug when they differ) -- for HEAD and POST too; it never reads
    a request body."""
    return make_app(app_kind, lambda req: (
        200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(declared))],
        (body[start:start + PIECE] for start in range(0, len(body), PIECE))), probe, stream=True)


def _read_all(opener, app_kind):
    def run():
        with opener.open("inproc://api/", timeout=_timeout_for(app_kind)) as resp:
            return resp.read()

    return _call(run)


def _raw_handler(probe, raw, protocol="HTTP/1.1", then=None):
    """A handler class that writes ``raw`` bytes as its whole answer."""

    class Raw(ProbedHandler):
        protocol_version = protocol
        app_probe = probe

        def do_GET(self):
            self.wfile.write(raw)
            if then is not None:
                then(self)

        do_HEAD = do_GET

    return Raw


def _expect_500(opener, app_kind):
    def run():
        try:
            opener.open("inproc://api/", timeout=_timeout_for(app_kind)).close()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()
        return None

    return _call(run)


# ---------------------------------------------------------------------------
# Loopback servers (the reference) and what urllib shows
# ---------------------------------------------------------------------------


class _LoopbackHTTPServer(http.server.ThreadingHTTPServer):
    # Request threads are joined by server_close(): no thread outlives a test.
    daemon_threads = False
    block_on_close = True


class _LoopbackWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = False
    block_on_close = True


class _QuietWSGIHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):
        pass

    def get_stderr(self):
        return io.StringIO()  # wsgiref prints the app's traceback there


@contextlib.contextmanager
def _loopback(app):
    """Serve ``app`` (handler class/partial or WSGI) on 127.0.0.1:0; yield
    its base URL; shut the server and every request thread down after."""
    target = app.func if isinstance(app, functools.partial) else app
    if isinstance(target, type) and issubclass(target, socketserver.BaseRequestHandler):
        server = _LoopbackHTTPServer(("127.0.0.1", 0), app)
    else:
        server = wsgiref.simple_server.make_server(
            "127.0.0.1", 0, app, server_class=_LoopbackWSGIServer, handler_class=_QuietWSGIHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield "http://127.0.0.1:%d" % server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)
        assert not thread.is_alive(), "the loopback server thread did not stop"


def _net_opener(*handlers):
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)


def _inproc_opener(apps, *handlers, **kw):
    return urllib.request.build_opener(
        ib.InProcHandler(apps, **kw), urllib.request.ProxyHandler({}), *handlers)


def _tail(url):
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment))


def _headers(msg):
    return [(k.lower(), v) for k, v in msg.items() if k.lower() not in ("date", "server")]


def _open_any(opener, url, timeout=WAIT, data=None):
    """The response to ``url`` (a URL or a Request), or the HTTPError that
    stands for it: either is a response to read and close."""
    try:
        return opener.open(url, data=data, timeout=timeout)
    except urllib.error.HTTPError as err:
        return err


def _observe(opener, url, timeout=WAIT, **req_kw):
    """What urllib shows for one request: a comparable tuple (closes all)."""
    req = urllib.request.Request(url, **req_kw)
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.__dict__.get("fp") is None:  # before 3.10 an fp-less HTTPError has no body
            return ("HTTPError", e.code, e.msg, _headers(e.hdrs), None, _tail(e.filename))
        try:
            return ("HTTPError", e.code, e.msg, _headers(e.hdrs), e.read(), _tail(e.filename))
        finally:
            e.close()
    with resp:
        return ("ok", resp.status, resp.reason, _headers(resp.headers), resp.read(),
                _tail(resp.geturl()))


def _outcome(opener, url, timeout=WAIT, **req_kw):
    """``_observe``, or the class of any other exception urllib raises."""
    try:
        return _observe(opener, url, timeout, **req_kw)
    except Exception as e:
        return ("raises", type(e))


def _error(opener, url, timeout=WAIT, **req_kw):
    """The exception class urllib raises (None when it raises nothing)."""
    try:
        with opener.open(urllib.request.Request(url, **req_kw), timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        e.close()
        return urllib.error.HTTPError
    except Exception as e:
        return type(e)
    return None


@contextlib.contextmanager
def _http_error(code=None):
    """Like pytest.raises(HTTPError), closing the error afterwards."""
    with pytest.raises(urllib.error.HTTPError) as info:
        yield info
    info.value.d_body = info.value.read()  # what read() gave before close()
    info.value.close()
    if code is not None:
        assert info.value.code == code


def _compare(make_route, requests, timeout, *extra_factories):
    """Run ``requests`` [(path, Request kwargs)] against ``make_app`` over
    loopback and in-process; assert urllib sees the same, and the app too."""
    net_calls, inproc_calls = [], []
    net_app, inproc_app = make_route(net_calls), make_route(inproc_calls)
    with _loopback(net_app) as base:
        net = _net_opener(*[f() for f in extra_factories])
        inproc = _inproc_opener({"api": inproc_app}, *[f() for f in extra_factories])
        for path, kw in requests:
            expected = _observe(net, base + path, **kw)
            got = _observe(inproc, "inproc://api" + path, timeout=timeout, **kw)
            assert got == expected, path
    assert inproc_calls == net_calls
    return inproc_calls


def _refused(opener, req, timeout, exc_class):
    """Assert opening ``req`` raises ``exc_class``; close any response."""
    try:
        resp = opener.open(req, timeout=timeout)
    except exc_class:
        return
    resp.close()
    pytest.fail("request was not refused: %r" % (req.full_url,))


# ---------------------------------------------------------------------------
# Routing, environ and framing apps served over loopback and in-process
# ---------------------------------------------------------------------------


def _md5(text):
    return hashlib.md5(text.encode("latin-1")).hexdigest()


def _digest_ok(authorization, method, path):
    """Check an RFC 2617 (qop=auth, MD5) Authorization header."""
    if not authorization or not authorization.startswith("Digest "):
        return False
    fields = urllib.request.parse_keqv_list(
        urllib.request.parse_http_list(authorization[len("Digest "):]))
    try:
        ha1 = _md5("%s:%s:%s" % (fields["username"], _REALM, _PASS))
        ha2 = _md5("%s:%s" % (method, fields["uri"]))
        expect = _md5(":".join(
            (ha1, fields["nonce"], fields["nc"], fields["cnonce"], fields["qop"], ha2)))
    except KeyError:
        return False
    return (fields["username"] == _USER and fields.get("realm") == _REALM
            and fields["nonce"] == _NONCE and fields.get("opaque") == _OPAQUE
            and fields["qop"] == "auth" and fields["uri"] == path and fields["response"] == expect)


def _route(method, path, query, body, get):
    """(status, headers, body) for a request; ``path`` is decoded (latin-1),
    ``get(name)`` reads a request header."""
    args = urllib.parse.parse_qs(query, encoding="latin-1")
    text = [("Content-Type", "text/plain")]
    if path in ("/go", "/dir/go"):
        code = int(args["code"][0])
        return ("%d %s" % (code, http.client.responses[code]),
                [*text, ("Location", args["to"][0])], b"moved")
    if path == "/ping":
        return "302 Found", [*text, ("Location", "http://api.internal/pong")], b"ping"
    if path == "/pong":
        return "302 Found", [*text, ("Location", "inproc://api/ping")], b"pong"
    if path == "/loop":
        return "302 Found", [*text, ("Location", "/loop")], b"again"
    if path.startswith("/chain/"):
        n = int(path[len("/chain/"):])
        if n < 20:
            return "302 Found", [*text, ("Location", "/chain/%d" % (n + 1))], b"next"
        return "200 OK", text, b"end of chain"
    if path == "/set-cookie":
        cookies = [("Set-Cookie", "%s=%s; Path=/" % (k, v[0])) for k, v in sorted(args.items())]
        return "200 OK", text + cookies, b"cookie set"
    if path == "/set-cookie-redirect":
        return "302 Found", [*text, ("Set-Cookie", "hop=1; Path=/"), ("Location", "/echo")], b""
    if path == "/basic":
        expect = "Basic " + base64.b64encode(("%s:%s" % (_USER, _PASS)).encode()).decode("ascii")
        if get("authorization") != expect:
            return ("401 Unauthorized",
                    [*text, ("WWW-Authenticate", 'Basic realm="%s"' % _REALM)], b"denied")
        return "200 OK", text, b"welcome, basic"
    if path == "/digest":
        if not _digest_ok(get("authorization"), method, path):
            challenge = 'Digest realm="%s", nonce="%s", qop="auth", algorithm=MD5, opaque="%s"' % (
                _REALM, _NONCE, _OPAQUE)
            return "401 Unauthorized", [*text, ("WWW-Authenticate", challenge)], b"denied"
        return "200 OK", text, b"welcome, digest"
    if path in ("/", "/echo") or path.startswith("/echo/"):
        seen = {"method": method, "path": path, "query": query,
                "body": body.decode("latin-1"), "cookie": get("cookie"),
                "content-type": get("content-type"), "x-extra": get("x-extra")}
        return "200 OK", [("Content-Type", "application/json")], json.dumps(
            seen, sort_keys=True).encode()
    if path == "/teapot":
        return "418 I'm a Teapot", [*text, ("X-Why", "short and stout")], b"no coffee"
    return "404 Not Found", text, b"nothing at " + path.encode("latin-1")


def _route_logic(calls):
    """``_route`` as logic for make_app(); ``calls`` records (method, path,
    query, body) per request."""

    def logic(req):
        calls.append((req.method, req.path, req.query, req.body))
        status, headers, out = _route(req.method, req.path, req.query, req.body, req.headers.get)
        return status, [*headers, ("Content-Length", str(len(out)))], [out]

    return logic


def _host_seer(seen):
    """logic recording the Host, User-Agent, Content-Type and Content-Length it got."""

    def logic(req):
        seen.append((req.headers["Host"], req.headers["User-Agent"],
                     req.headers.get("Content-Type"), req.headers.get("Content-Length")))
        return 204, [], []

    return logic


@pytest.fixture
def docroot(tmp_path):
    (tmp_path / "hello.txt").write_bytes(b"hello, world\n" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.txt").write_bytes(b"inner")
    (tmp_path / "caf\u00e9.txt").write_bytes(b"unicode name")
    (tmp_path / "page.html").write_bytes(b"<p>hi</p>")
    return tmp_path


class _HandWrittenFramingHandler(QuietHandler):
    """Writes its framing by hand: chunked (with an extension and a trailer),
    close-delimited and Content-Length bodies."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first ", b"second;", b"", b"x" * 5000):
                if part:
                    self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
            self.wfile.write(b"0\r\nX-Trailer: t\r\n\r\n")
        elif self.path == "/close":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(5):
                self.wfile.write(b"line %d\n" % i)
                self.wfile.flush()
        else:
            body = b"sized body"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


class _SendErrorHandler(QuietHandler):
    def do_GET(self):
        if self.path == "/teapot":
            self.send_error(418, "Short and stout", "Tip me over and pour me out")
        elif self.path == "/unavailable":
            self.send_error(503)
        elif self.path == "/bad":
            self.send_error(400, "Bad <request>")
        else:
            self.send_error(404)

    do_HEAD = do_GET


def _environ_app(calls, hosts=None):
    """Echoes the environ keys both servers must agree on; ``hosts`` (if
    given) records HTTP_HOST, which differs between them."""
    keys = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_LENGTH",
            "SERVER_PROTOCOL", "REMOTE_ADDR", "wsgi.url_scheme")

    def environ_app(environ, start_response):
        body = _read_input(environ)
        seen = {k: environ.get(k) for k in keys}
        # PEP 3333 lets both be empty or absent: wsgiref sends CONTENT_LENGTH
        # '' and CONTENT_TYPE 'text/plain' for a request without them.
        seen["CONTENT_LENGTH"] = environ.get("CONTENT_LENGTH") or None
        seen["CONTENT_TYPE"] = environ.get("CONTENT_TYPE") if seen["CONTENT_LENGTH"] else None
        seen.update((k, v) for k, v in environ.items()
                    if k.startswith("HTTP_") and k != "HTTP_HOST")
        seen["body"] = body.decode("latin-1")
        calls.append(seen)
        if hosts is not None:
            hosts.append((environ.get("HTTP_HOST"), environ["SERVER_PORT"]))
        out = json.dumps(seen, sort_keys=True).encode()
        start_response("200 OK", [("Content-Type", "application/json; charset=utf-8")])
        return [out]

    return wsgiref.validate.validator(environ_app)


def _framing_wsgi(calls):
    """Responses without a Content-Length, framed by the server."""

    def framing_app(environ, start_response):
        path = environ["PATH_INFO"]
        calls.append(path)
        text = [("Content-Type", "text/plain")]
        if path == "/boom":
            raise RuntimeError("d: failed before responding")
        if path == "/no-content":
            start_response("204 No Content", [])
            return []
        start_response("200 OK", [*text, ("X-Path", path)])
        if path == "/one":
            return [b"single chunk"]
        if path == "/many":
            return [b"first,", b"", b"second,", b"third"]
        if path == "/empty":
            return []
        if path == "/empty-chunks":
            return [b"", b""]
        if path == "/gen":
            return (part for part in (b"", b"g1,", b"", b"g2"))
        return [b"other"]

    return wsgiref.validate.validator(framing_app)


class _RequestEchoHandler(QuietHandler):
    """Echoes the request line, every header but Host, and the raw body
    bytes as they arrived in rfile (chunked framing included)."""

    def _echo(self):
        if self.headers.get("Transfer-Encoding") == "chunked":
            raw = []
            while True:
                line = self.rfile.readline()
                raw.append(line)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    raw.append(self.rfile.readline())
                    break
                raw.append(self.rfile.read(size + 2))
            body = b"".join(raw)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        head = ["%s %s %s" % (self.command, self.path, self.request_version)]
        head += ["%s: %s" % (k, v) for k, v in self.headers.items() if k.lower() != "host"]
        out = ("\n".join(head) + "\n\n").encode("latin-1") + body
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = _echo


def _chunks():
    yield b"alpha,"
    yield bytearray(b"beta,")
    yield memoryview(b"gamma")


def _network_redirector(location, code=302):
    class NetRedirect(QuietHandler):
        def do_GET(self):
            self.send_response(code)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return NetRedirect


# ---------------------------------------------------------------------------
# urllib handlers: redirects, auth, interception, xmlrpc
# ---------------------------------------------------------------------------


class RecordingRedirects(urllib.request.HTTPRedirectHandler):
    max_repeats = 1
    max_redirections = 3

    def __init__(self):
        self.seen = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append((code, newurl))
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.add_header("X-extra", "from-redirector")
        return new


class RefusingRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self):
        self.seen = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(newurl)
        return None


@contextlib.contextmanager
def _dropped_responses():
    """urllib's auth handlers drop each 401 response unclosed; record the
    ResourceWarnings that may cause instead of failing on them (see
    test_auth_dropped_401_responses_do_not_warn)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield caught
        gc.collect()


def _password_mgr(uri, password=_PASS):
    mgr = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    mgr.add_password(None, uri, _USER, password)
    return mgr


class FallThroughHTTP(urllib.request.HTTPHandler):
    """Stands in for the network: records what reached urllib's real
    handler and fails it at once (loopback requests really go out)."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def http_open(self, req):
        if req.host.startswith("127.0.0.1:"):
            return super().http_open(req)
        self.seen.append(req.full_url)
        raise urllib.error.URLError("d: fell through to the network")


class FallThroughHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def https_open(self, req):
        self.seen.append(req.full_url)
        raise urllib.error.URLError("d: fell through to the network")


def _intercept_opener(apps, seen):
    return _inproc_opener(apps, FallThroughHTTP(seen), FallThroughHTTPS(seen), intercept_http=True)


class OpenerTransport(xmlrpc.client.Transport):
    """Sends XML-RPC through a urllib opener (so through the bridge)."""

    def __init__(self, opener, scheme, timeout=None):
        super().__init__()
        self._d_opener = opener
        self._d_scheme = scheme
        self._d_timeout = timeout

    def request(self, host, handler, request_body, verbose=False):
        self.verbose = verbose  # parse_response() reads it
        url = "%s://%s%s" % (self._d_scheme, host, handler)
        req = urllib.request.Request(url, data=request_body, headers={
            "Content-Type": "text/xml", "User-Agent": self.user_agent})
        try:
            resp = self._d_opener.open(req, timeout=self._d_timeout)
        except urllib.error.HTTPError as e:
            try:
                raise xmlrpc.client.ProtocolError(url, e.code, e.msg, e.headers) from None
            finally:
                e.close()
        with resp:
            return self.parse_response(resp)


def _rpc_divide(a, b):
    return a / b


@contextlib.contextmanager
def _rpc_server(bind):
    server = xmlrpc.server.SimpleXMLRPCServer(("127.0.0.1", 0), bind_and_activate=bind,
                                              logRequests=False, allow_none=True)
    server.register_introspection_functions()
    server.register_multicall_functions()
    server.register_function(pow)
    server.register_function(_rpc_divide, "divide")
    server.register_function(lambda *xs: list(reversed(xs)), "reverse")
    # xmlrpc marshals exact types only: a Source travels as its str value
    server.register_function(lambda: ib.current_source() and str(ib.current_source()), "source")
    if not bind:
        try:
            yield server
        finally:
            server.server_close()
        return
    with _serving(server):
        yield server


@contextlib.contextmanager
def _serving(server, **thread_args):
    """``server`` serving in a thread; shut down, closed and joined afterwards."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                              **thread_args)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)
        assert not thread.is_alive(), "the loopback server thread did not stop"


def _rpc_session(proxy):
    out = [proxy.pow(2, 10), proxy.reverse(1, "two", [3.0], {"k": None}, True),
           proxy.divide(7, 2), sorted(proxy.system.listMethods()),
           proxy.reverse(xmlrpc.client.Binary(b"\x00\xff"), "caf\u00e9")]
    multi = xmlrpc.client.MultiCall(proxy)
    multi.pow(3, 3)
    multi.divide(1, 4)
    out.append(list(multi()))
    with pytest.raises(xmlrpc.client.Fault) as info:
        proxy.divide(1, 0)
    out.append((info.value.faultCode, info.value.faultString))
    with pytest.raises(xmlrpc.client.Fault) as info:
        proxy.no_such_method()
    out.append(info.value.faultString)
    return out


# ---------------------------------------------------------------------------
# Probes, threads, watchdogs
# ---------------------------------------------------------------------------


class AppFault(Exception):
    """What test apps raise on purpose."""


class BodyFault(Exception):
    """What a caller's request-body iterator raises on purpose."""


def _worker_threads():
    return [t for t in threading.enumerate() if t.name == "inproc_bridge-worker"]


def _drain_workers(timeout=WAIT):
    """Wait until every bridge worker thread has exited.  Idle workers wait
    with the idle timeout read when they started waiting, so each is handed
    a request (each held until all have one) to make it wait again with the
    current (short) one."""
    idle = _idle_workers()
    if idle:
        held = threading.Barrier(idle)

        def logic(req):
            with contextlib.suppress(threading.BrokenBarrierError):
                held.wait(WAIT)
            return 204, [], []

        opener = _opener({"wake": make_app("handler", logic)})
        _run_threads([lambda: opener.open("inproc://wake/", timeout=WAIT).close()] * idle)
    return _wait_for(lambda: not _worker_threads(), timeout)


def _idle_workers():
    idle = ib._workers.idle()
    return idle if isinstance(idle, int) else len(idle)


def _assert_threads_back(baseline):
    assert _drain_workers(), "bridge workers still busy: %r" % (_worker_threads(),)
    _wait_for(lambda: threading.active_count() <= baseline)
    assert threading.active_count() <= baseline, (
        "threads did not return to the baseline %d: %r" % (baseline, threading.enumerate())
    )


def _assert_no_app_left(probe):
    """Every app that started has finished (a request that failed while it
    was being sent may never start its app: that is no leak)."""
    # No bridge worker is running a job (each alive worker is idle).
    assert _wait_for(lambda: len(_worker_threads()) <= _idle_workers()), (
        "a bridge worker is still busy (leak)")
    assert probe.wait_finished(probe.started), "%d of %d started apps finished (leak)" % (
        probe.finished, probe.started)


def _live(cls):
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, cls))


@pytest.fixture
def worker_pool(monkeypatch):
    """Idle workers exit after 50 ms; yields the thread count with no
    bridge worker alive (the baseline to return to)."""
    monkeypatch.setattr(ib, "WORKER_IDLE_SECONDS", 0.05)
    assert _drain_workers(), "bridge workers left busy by an earlier test: %r" % (
        _worker_threads(),
    )
    yield threading.active_count()


def _call(fn, timeout=WATCHDOG):
    """Run ``fn`` in a watchdog thread: its result, its exception, or a
    failure if it is still running after ``timeout`` seconds (a hang)."""
    box = []
    _run_threads([lambda: box.append(fn())], timeout)
    return box[0]


def _held_stream(gate, waited):
    """Body chunks: FIRST, then -- once ``gate`` is set (``waited`` notes
    whether it was in time) -- b"second|" and b"third"."""
    yield FIRST
    waited.append(gate.wait(WAIT))
    yield b"second|"
    yield b"third"


def _run_threads(targets, timeout=WATCHDOG):
    """Run each callable in its own thread; fail on a hang, re-raise the
    first error."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # handed to the test
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(fn), name="r-client", daemon=True) for fn in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = sum(thread.is_alive() for thread in threads)
    if alive:
        pytest.fail("hang: %d of %d threads still running after %s s"
                    % (alive, len(threads), timeout))
    if errors:
        raise errors[0]


def _fresh_chunks(total, size=PIECE):
    """``total`` bytes as fresh ``size``-byte objects, made one at a time
    (a chunk a pipe still holds costs memory of its own)."""
    filler = bytes(range(256)) * (size // 256)
    for i in range(total // size):
        yield i.to_bytes(8, "big") + filler[8:]


def _counted_chunks(sent, total=BIG):
    """_fresh_chunks(total); once all are out, ``sent`` holds their size and
    CRC-32."""
    crc = size = 0
    for chunk in _fresh_chunks(total):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
        yield chunk
    sent["size"], sent["crc"] = size, crc


def _traced(work, *, peak=False):
    """``work()`` under tracemalloc, started after a collection: its result and
    the bytes allocated since the start -- still held after a second
    collection, or with ``peak`` the most held at once."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = work()
        if not peak:
            gc.collect()
        return result, tracemalloc.get_traced_memory()[1 if peak else 0] - base
    finally:
        tracemalloc.stop()


def _slow_read_peak(opener, timeout):
    """Read inproc://api/big slowly (yielding after every piece) under
    tracemalloc: (bytes read, their crc32, peak bytes held beyond the start)."""
    def read():
        crc = size = 0
        with opener.open("inproc://api/big", timeout=timeout) as resp:
            while True:
                data = resp.read(PIECE)
                if not data:
                    break
                crc = zlib.crc32(data, crc)
                size += len(data)
                time.sleep(0)  # a slow reader: it yields after every piece
        return size, crc

    (size, crc), peak = _traced(read, peak=True)
    return size, crc, peak


class Tally:
    """Length and CRC of what an app read; fails once more than
    ``fail_after`` bytes were read."""

    def __init__(self, fail_after=None):
        self.crc = self.total = 0
        self.fail_after = fail_after

    def add(self, data):
        self.crc = zlib.crc32(data, self.crc)
        self.total += len(data)
        if self.fail_after is not None and self.total > self.fail_after:
            raise AppFault("the app failed after reading %d bytes" % self.total)

    def answer(self):
        return b"%d:%d" % (self.total, self.crc)


class Probe:
    """Counts app tasks that started and finished (thread-safe); ``loop``:
    the event loop an ASGI app it counts ran on."""

    def __init__(self):
        self._cond = threading.Condition()
        self.started = 0
        self.finished = 0
        self.events = []
        self.tallies = collections.Counter()  # constant memory, for the leak tests
        self.loop = None

    def tally(self, kind, detail=None):
        with self._cond:
            self.tallies[kind, detail] += 1

    def start(self):
        with contextlib.suppress(RuntimeError):  # not on a loop
            self.loop = asyncio.get_running_loop()
        with self._cond:
            self.started += 1

    def note(self, kind, detail=None):
        with self._cond:
            self.events.append((kind, detail))

    def details(self, kind):
        with self._cond:
            return [detail for k, detail in self.events if k == kind]

    def finish(self):
        with self._cond:
            self.finished += 1
            self._cond.notify_all()

    def wait_finished(self, n=1, timeout=WAIT):
        with self._cond:
            return self._cond.wait_for(lambda: self.finished >= n, timeout)


def _wait_for(predicate, timeout=WAIT):
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.005)
    return True


# ---------------------------------------------------------------------------
# ASGI helpers
# ---------------------------------------------------------------------------


class Baton:
    """Lock-step between test threads and async apps on any loop, without
    sleeps or polling: an app awaits ``take()``, a thread calls ``give()``;
    ``give(math.inf)`` leaves it open, a gate every waiter passes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tokens = 0
        self._waiters = []

    async def take(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._tokens:
                    self._tokens -= 1
                    return
                future = loop.create_future()
                self._waiters.append((loop, future))
            await asyncio.wait_for(future, WAIT)

    def give(self, tokens=1):
        with self._lock:
            self._tokens += tokens
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_settle, future)


async def _receive_messages(receive):
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body"):
            return messages


def _asgi_app(status=200, body=b"ok", headers=((b"content-type", b"text/plain"),), seen=None):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        if seen is not None:
            seen.append(scope)
        await _receive_messages(receive)
        await _send(send, body, status, list(headers))

    return app


class LifespanApp:
    """An app that speaks the lifespan protocol and records what happened."""

    def __init__(self, fail=None):
        self.fail = fail
        self.events = []
        self.shutdown = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            message = await receive()
            self.events.append(message["type"])
            if self.fail:
                await send({"type": "lifespan.startup.failed", "message": self.fail})
                return
            scope["state"]["db"] = "connected"
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            self.events.append(message["type"])
            await send({"type": "lifespan.shutdown.complete"})
            self.shutdown.set()
            return
        await _receive_messages(receive)
        state = scope.get("state")
        body = repr(sorted(state.items())).encode() if state is not None else b"no state"
        if state is not None:
            state["db"] = "changed by a request"  # a copy: the next request won't see it
        await _send(send, body)


class Bridge:
    """A fresh InProcHandler and an opener over it.  As a context manager
    it is closed (its loop stopped) on exit and unpacks to (opener,
    handler); ``new_threads()`` lists the threads it left."""

    def __init__(self, apps, **kwargs):
        self.before = set(threading.enumerate())
        self.handler = ib.InProcHandler(apps, **kwargs)
        self.opener = urllib.request.build_opener(self.handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __iter__(self):
        return iter((self.opener, self.handler))

    def close(self):
        self.handler.close()

    def new_threads(self, timeout=WAIT):
        """Threads alive now that were not before the bridge was made
        (bounded poll: a thread that was joined may take a moment to go)."""
        def extra():
            return [t for t in threading.enumerate() if t not in self.before and t.is_alive()]

        _wait_for(lambda: not extra(), timeout)
        return extra()


def _loop_tasks(loop):
    """How many tasks run on ``loop`` now (the one that counts them aside)."""
    async def count():
        return len(asyncio.all_tasks()) - 1

    return asyncio.run_coroutine_threadsafe(count(), loop).result(WAIT)


def _tasks_drained(probe, timeout=WAIT):
    """Wait (bounded poll) until the loop the probe's ASGI apps ran on runs no
    task; how many are left (0: drained; also when no ASGI app ran)."""
    loop = probe.loop
    if loop is None or not loop.is_running():
        return 0
    _wait_for(lambda: not _loop_tasks(loop), timeout)
    return _loop_tasks(loop)


def _settle(future):
    if not future.done():
        future.set_result(None)


def _dropped_body_spinner(give_up):
    """An ASGI app in a tight loop whose only await is send() of a body the
    bridge drops (the caller asked for HEAD), and what it did: ``looping``
    once it has sent 100 messages; ``ended``: the exception that ended it
    (re-raised) or "gave up" after ``give_up`` seconds; ``done``.  ``stop``
    is the test's safety net to end a loop the app starves."""
    state = types.SimpleNamespace(stop=threading.Event(), looping=threading.Event(),
                                  done=threading.Event(), ended=None, sends=0)

    async def spinner(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        deadline = time.monotonic() + give_up
        try:
            while not state.stop.is_set() and time.monotonic() < deadline:
                await send({"type": "http.response.body", "body": b"x" * 64, "more_body": True})
                state.sends += 1
                if state.sends == 100:
                    state.looping.set()
            state.ended = "gave up"
        except BaseException as exc:  # OSError or CancelledError expected
            state.ended = exc
            raise
        finally:
            state.done.set()

    return spinner, state


# ---------------------------------------------------------------------------
# Randomized faults
# ---------------------------------------------------------------------------


def _pieces(rng, most=6, sizes=FAULT_SIZES):
    pieces = []
    for _ in range(rng.randint(0, most)):
        size = rng.choice(sizes)
        offset = rng.randrange(len(SOURCE) - size + 1)
        pieces.append(SOURCE[offset:offset + size])
    return pieces


def _read_once(resp, kind, size):
    if kind == "read":
        return resp.read(size)
    if kind == "read1":
        return resp.read1(size)
    if kind == "readinto":
        buf = bytearray(size)
        return bytes(buf[:resp.readinto(buf)])
    if kind == "readline":
        return resp.readline()
    return resp.read()


def _exchange(opener, url, timeout, plan, close_after):
    """One request read as ``plan`` says; what the caller saw."""
    out = {"status": None, "body": b"", "error": None, "eof": False, "closed_early": False}
    try:
        resp = opener.open(url, timeout=timeout)
    except urllib.error.HTTPError as err:
        with err:
            out["status"] = err.code
            try:
                out["body"] = err.read()
            except ALLOWED as exc:
                out["error"] = exc
        return out
    except ALLOWED as exc:
        out["error"] = exc
        return out
    got = bytearray()
    with resp:
        out["status"] = resp.status
        for i in itertools.count():
            if close_after is not None and i == close_after:
                out["closed_early"] = True
                break
            kind, size = plan[i % len(plan)]
            try:
                data = _read_once(resp, kind, size)
            except ALLOWED as exc:
                out["error"] = exc
                break
            if not data:
                out["eof"] = True
                break
            got += data
    out["body"] = bytes(got)
    return out


def _fault_case(kind, seed):
    """The random response scenario for one seed of ``kind``: the same case
    on every run (a failing seed replays).  Common to every kind: the body's
    pieces, the points where the app faults (AppFault) or stalls until the
    caller is gone, the caller's reads (method and size), its early close
    and its timeout (STALL_TIMEOUT when the app stalls).  Per kind:

    * handler: framing ``length``, ``chunked`` or ``close`` (HTTP/1.0), the
      wfile buffer size, a flush after each piece or not; points -1 (before
      the head), i (before piece i), len(pieces) (after the last).
    * WSGI: framing ``length`` or ``none``; each piece goes out by one
      channel: ``write`` (the write() callable, inside the app call),
      ``yield`` (the returned iterable) or ``iter-write`` (write() called
      from inside the iterable, as imperative frameworks do), the yielded
      ones maybe as a list; points -1, i, len(pieces) and "close" (in the
      iterable's close).  Only an app on a worker stalls (an inline app that
      stalls stalls its caller).
    * ASGI: sometimes a piece bigger than the pipe holds (the app blocks on a
      full pipe); framing ``none``, ``exact``, ``over`` (declares more than
      the app sends: the body ends short) or ``under`` (declares less: the
      app's send raises once it passes it); the last piece may close the
      body itself; points -1, i, len(pieces) (before the closing message,
      unless the last piece closed it) and "after" (once complete).

    The draws keep the order of the three per-kind generators this one
    replaced, so each seed builds the case it built before."""
    rng = random.Random(seed)
    asgi = kind == "asgi"
    pieces = _pieces(rng, sizes=ASGI_FAULT_SIZES if asgi else FAULT_SIZES)
    case = types.SimpleNamespace(kind=kind, pieces=pieces, wbufsize=None, flushes=None,
                                 written=0, channels=[], as_list=False, declared=None,
                                 last_closes=False)
    if kind == "handler":
        case.framing = rng.choice(["length", "chunked", "close"])
        case.wbufsize = rng.choice([0, -1, 1024])
        case.flushes = [rng.random() < 0.5 for _ in pieces]
        points = [-1, *range(len(pieces) + 1)]
        stall_points = points
    elif asgi:
        if rng.random() < 0.3:
            pieces.insert(rng.randint(0, len(pieces)), SOURCE[:FLOOD])
        total = sum(map(len, pieces))
        case.framing = rng.choice(["none", "none", "exact", "exact", "over", "under"])
        if case.framing == "under" and total == 0:
            case.framing = "over"
        over = total + rng.randint(1, 1000)
        under = rng.randrange(total) if total else None
        case.declared = {"none": None, "exact": total, "over": over, "under": under}[case.framing]
        case.last_closes = bool(pieces) and rng.random() < 0.5
        n = len(pieces)
        points = [-1, *range(n), *([] if case.last_closes else [n]), "after"]
        stall_points = points[:-1]
    else:
        case.written = rng.randint(0, len(pieces))
        case.channels = ["write"] * case.written + [
            rng.choice(["yield", "yield", "yield", "iter-write"]) for _ in pieces[case.written:]]
        case.as_list = "iter-write" not in case.channels and rng.random() < 0.3
        points = [-1, *range(case.written if case.as_list else len(pieces) + 1), "close"]
        stall_points = points[:-1] if kind == "wsgi-worker" else []
    case.fault = rng.choice(points) if rng.random() < (0.5 if asgi else 0.35) else None
    case.stall = rng.choice(stall_points) if stall_points and rng.random() < 0.15 else None
    if kind == "handler":
        case.timeout = STALL_TIMEOUT if case.stall is not None else rng.choice([None, 5])
    case.plan = [(rng.choice(READ_KINDS), rng.choice(READ_SIZES)) for _ in range(rng.randint(1, 4))]
    case.close_after = rng.randint(0, 5) if rng.random() < (0.3 if asgi else 0.2) else None
    if asgi:
        case.timeout = STALL_TIMEOUT if case.stall is not None else rng.choice([None, 5])
    elif kind != "handler":
        case.framing = "length" if rng.random() < 0.3 else "none"
        case.timeout = STALL_TIMEOUT if case.stall is not None else _timeout_for(kind)
    case.full = b"".join(pieces)
    # What a correct caller reads: all the app sends; with a Content-Length
    # that is too small, the app's send fails once it passes it, and what a
    # caller may read cleanly is at most the declared bytes.
    case.expected = case.full[:case.declared] if case.framing == "under" else case.full
    # Whether the caller may see an error.
    case.faulty = case.stall is not None or case.fault not in (None, "close", "after") or (
        case.framing in ("over", "under"))
    return case


def _fault_app(case, probe):
    """The app of ``case.kind`` that sends ``case.pieces`` as the case says."""
    pieces, fault, stall = case.pieces, case.fault, case.stall
    if case.kind == "asgi":

        async def app(scope, receive, send):
            assert scope["type"] == "http"
            probe.start()
            try:
                first = await receive()
                assert first == {"type": "http.request", "body": b"", "more_body": False}, first

                async def point(i):
                    if stall == i:
                        # Wait for the caller to time out and leave.
                        probe.note("stall", await receive())
                        return True
                    if fault == i:
                        raise AppFault("fault at point %r" % (i,))
                    return False

                try:
                    if await point(-1):
                        return
                    headers = [(b"content-type", b"application/octet-stream")]
                    if case.declared is not None:
                        headers.append((b"content-length", str(case.declared).encode()))
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    for i, piece in enumerate(pieces):
                        if await point(i):
                            return
                        more = not (case.last_closes and i == len(pieces) - 1)
                        await send({"type": "http.response.body", "body": piece, "more_body": more})
                    if not case.last_closes:
                        if await point(len(pieces)):
                            return
                        await send({"type": "http.response.body", "body": b""})
                except OSError as exc:
                    # The caller left while the app was sending: its next
                    # receive() must say so.
                    probe.note("send-error", type(exc))
                    probe.note("after-send-error", await receive())
                    raise
                await point("after")
                # Complete: the next event is the disconnect (at once).
                probe.note("end", await receive())
            except BaseException as exc:
                probe.note("raised", type(exc))
                raise
            finally:
                probe.finish()

        return app

    def point(i, flush=None):
        if stall == i:
            if flush is not None:
                flush()
            probe.note("stall", ib.cancelled().wait(WAIT))
        if fault == i:
            raise AppFault("fault at point %r" % (i,))

    if case.kind == "handler":

        class Random(ProbedHandler):
            protocol_version = "HTTP/1.0" if case.framing == "close" else "HTTP/1.1"
            app_probe = probe
            wbufsize = case.wbufsize

            def do_GET(self):
                point(-1, self.wfile.flush)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if case.framing == "length":
                    self.send_header("Content-Length", str(len(case.full)))
                elif case.framing == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, piece in enumerate(pieces):
                    point(i, self.wfile.flush)
                    if case.framing != "chunked":
                        self.wfile.write(piece)
                    elif piece:
                        self.wfile.write(_chunk(piece))
                    if case.flushes[i]:
                        self.wfile.flush()
                point(len(pieces), self.wfile.flush)
                if case.framing == "chunked":
                    self.wfile.write(b"0\r\n\r\n")

        return Random
    holder = {}

    def wsgi_app(environ, start_response):
        point(-1)
        headers = [("Content-Type", "application/octet-stream")]
        if case.framing == "length":
            headers.append(("Content-Length", str(len(case.full))))
        write = holder["write"] = start_response("200 OK", headers)
        for i in range(case.written):
            point(i)
            write(pieces[i])
        if case.as_list:
            return pieces[case.written:]
        return body()

    def body():
        for i in range(case.written, len(pieces)):
            point(i)
            if case.channels[i] == "iter-write":
                holder["write"](pieces[i])
            else:
                yield pieces[i]
        point(len(pieces))

    return _tracked_wsgi(wsgi_app, probe, lambda: point("close"))


def _fault_statuses(case):
    """The statuses the caller may see (None: no response at all).  500
    while nothing can have left; 200 once the head has left.  A handler or
    WSGI app that stalls may time its caller out at any point; an ASGI app
    leaves it no response only when it stalls before the head.  WSGI: on a
    worker any non-empty write() or chunk sends the head; inline, data
    written during the app call waits for it to return, and the iterable's
    first non-empty chunk sends it."""
    fault, pieces = case.fault, case.pieces
    if case.kind == "asgi":
        if case.stall == -1:
            return (None,)
        return (500,) if fault == -1 else (200,)
    anything = (None, 200, 500)
    if case.stall is not None:
        return anything
    if case.kind == "handler":
        return (500,) if fault == -1 else (200,)
    if fault is None or fault == "close":
        return (200,)
    if fault == -1 or not any(pieces[:fault]):
        return (500,)
    if case.kind == "wsgi-worker":
        return (200,)
    if fault < case.written:
        return (500,)  # the app call raised: its written data never left
    if any(pieces[:case.written]):
        return (200,)
    if any(p for p, c in zip(pieces[:fault], case.channels) if c == "yield"):
        return (200,)
    return anything  # only data written from inside the iterable preceded the fault


def _check_fault_outcome(case, out, probe):
    """The invariant: exact bytes, or a prefix and an allowed error (or an
    early close by the caller) -- never a short body that looks complete; a
    500 only from an app that faulted before anything left; the app
    finished once, and an ASGI app's receive() said the caller was gone."""
    shown = {k: v for k, v in vars(case).items() if k not in ("pieces", "full", "expected")}
    summary = "case=%r sizes=%r status=%r got=%d/%d eof=%r closed_early=%r error=%r events=%r" % (
        shown, [len(p) for p in case.pieces], out["status"], len(out["body"]),
        len(case.expected), out["eof"], out["closed_early"], out["error"], probe.events)
    asgi = case.kind == "asgi"
    body, error = out["body"], out["error"]
    assert out["status"] in _fault_statuses(case), summary
    if out["status"] == 500:
        assert case.faulty, summary
        if asgi:
            assert body == b"Internal Server Error" or body.startswith(b"A server"), summary
    else:
        if out["status"] is None and asgi:
            assert isinstance(error, socket.timeout), summary
        if out["eof"]:
            assert body == case.expected, "a clean end with the wrong bytes: " + summary
            if asgi:
                # A body that cannot reach its Content-Length never ends cleanly.
                assert case.framing != "over", summary
                # Nor does one whose app failed before completing it, when no
                # Content-Length tells the caller where it ends.
                midway = isinstance(case.fault, int) and (
                    case.stall is None or case.stall > case.fault)
                assert not (case.framing == "none" and midway), \
                    "the app failed midway, the caller saw a clean end: " + summary
        else:
            assert case.expected.startswith(body) or (
                case.framing == "under" and case.full.startswith(body)), \
                "bytes the app never sent: " + summary
            assert error is not None or out["closed_early"], summary
        if error is not None:
            assert isinstance(error, ALLOWED), summary
            assert case.faulty, "an error from a well-behaved app: " + summary
    assert probe.finished == 1, summary
    if asgi:
        # Whatever happened, the app's receive() said the caller was gone.
        for kind in ("stall", "after-send-error", "end"):
            for message in probe.details(kind):
                assert message == {"type": "http.disconnect"}, summary
        if probe.details("send-error"):
            assert probe.details("send-error") == [BrokenPipeError], summary
    else:
        assert probe.details("stall") in ([], [True]), summary


def _fault_cases():
    """(kind, seed) for every kind, as ids "kind-seed"; the first seeds of
    each kind run always, the rest with the heavy tests."""
    cases = []
    for kind in APP_KINDS:
        quick, total = ((ASGI_QUICK_SEEDS, ASGI_ALL_SEEDS) if kind == "asgi"
                        else (QUICK_SEEDS, ALL_SEEDS))
        for seed in range(total):
            marks = [pytest.mark.heavy] if seed >= quick else []
            cases.append(pytest.param(kind, seed, marks=marks, id="%s-%d" % (kind, seed)))
    return cases


def _request_case(seed):
    """The random scenario for one request-body seed: the body's shape and
    pieces, where the caller's body iterator fails (before piece i) and after
    how many read bytes the app fails, and the app's read sizes."""
    rng = random.Random(seed)
    pieces = _pieces(rng, most=8)
    expected = b"".join(pieces)
    shape = rng.choice(["bytes", "list", "generator", "file"])
    body_fault = None
    if shape == "generator" and rng.random() < 0.3:
        body_fault = rng.randint(0, len(pieces))
    app_fault = None
    if expected and rng.random() < 0.25:
        app_fault = rng.randrange(len(expected))
    return types.SimpleNamespace(
        pieces=pieces, expected=expected, shape=shape,
        declare_length=shape != "bytes" and rng.random() < 0.3,
        body_fault=body_fault, app_fault=app_fault,
        reads=[rng.choice(READ_SIZES) for _ in range(3)], readline=rng.random() < 0.3)


def _request_data(case):
    if case.shape == "bytes":
        return case.expected
    if case.shape == "file":
        return io.BytesIO(case.expected)
    if case.shape == "list":
        return list(case.pieces)

    def generate():
        for i, piece in enumerate(case.pieces):
            if case.body_fault == i:
                raise BodyFault("the body broke before piece %d" % i)
            yield piece
        if case.body_fault == len(case.pieces):
            raise BodyFault("the body broke at its end")

    return generate()


def _load_parts(i):
    """Stream i's body: its tag, then 1 to 12 random parts (0 to 9000 bytes)."""
    rng = random.Random(i)
    parts = [b"%d|" % i]
    for _ in range(rng.randint(1, 12)):
        size = rng.choice((0, 1, 10, 500, 4096, 9000))
        offset = rng.randrange(len(SOURCE) - size + 1)
        parts.append(SOURCE[offset:offset + size])
    return parts


# ---------------------------------------------------------------------------
# Fork, request bodies, WSGI results
# ---------------------------------------------------------------------------


_needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _forked(start, child):
    """Run ``child(report)`` in a forked process -- ``os.fork()`` or
    multiprocessing's fork context -- and return (reports, exit code, pid).
    ``report(value)`` sends one JSON value to the parent.  The child always
    leaves through os._exit(); a watchdog makes it exit 99 after WAIT seconds,
    and the parent kills it if it is still there WAIT + 5 seconds on."""
    rfd, wfd = os.pipe()

    def main():
        code = 1
        try:
            watchdog = threading.Timer(WAIT, os._exit, (99,))
            watchdog.daemon = True
            watchdog.start()
            os.close(rfd)

            def report(value):
                os.write(wfd, (json.dumps(value) + "\n").encode())

            try:
                child(report)
                code = 0
            except BaseException as exc:
                report(["child raised", repr(exc)])
        finally:
            os._exit(code)

    proc = pid = None
    try:
        with warnings.catch_warnings():
            # 3.12+ warns about fork() in a process with threads: here that is the point.
            warnings.filterwarnings(
                "ignore", category=DeprecationWarning,
                message=r"This process (\(pid=\d+\) )?is multi-threaded, use of fork\(\)")
            if start == "os.fork":
                pid = os.fork()
                if pid == 0:
                    main()  # never returns
            else:
                proc = multiprocessing.get_context("fork").Process(target=main, daemon=True)
                proc.start()
                pid = proc.pid
    except BaseException:
        os.close(wfd)
        os.close(rfd)
        raise
    os.close(wfd)
    deadline = time.monotonic() + WAIT + 5
    data = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                break
            part = os.read(rfd, 65536)
            if not part:
                break
            data += part
    finally:
        os.close(rfd)
    if proc is not None:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(WAIT)
        code = proc.exitcode
        proc.close()
    else:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
                break
            select.select([], [], [], 0.01)  # bounded poll for the child's exit
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    return [json.loads(line) for line in data.decode().splitlines()], code, pid


def _body_app(kind, serve):
    """An app of ``kind`` (an APP_KINDS value) that answers 200 with
    ``serve(path, read)``; ``read(n)`` reads the request body as that kind
    reads it (req.rfile): bytes, b"" at its end, an OSError when it broke off
    (ASGI's http.disconnect is raised as ConnectionResetError).  ``serve`` may
    block: on ASGI it runs on an executor thread."""

    def logic(req):
        out = serve(req.path, req.rfile.read)
        return 200, [("Content-Type", "application/octet-stream"),
                     ("Content-Length", str(len(out)))], [out]

    return make_app(kind, logic, stream=True)


class _RecordedFile(io.BytesIO):
    """A request body file that notes the thread of every read."""

    def __init__(self, data, readers):
        super().__init__(data)
        self.readers = readers

    def read(self, size=-1):
        self.readers.append(threading.get_ident())
        return super().read(size)

    def read1(self, size=-1):
        self.readers.append(threading.get_ident())
        return super().read1(size)

    def readinto(self, b):
        self.readers.append(threading.get_ident())
        return super().readinto(b)

    def readinto1(self, b):
        self.readers.append(threading.get_ident())
        return super().readinto1(b)

    def readline(self, size=-1):
        self.readers.append(threading.get_ident())
        return super().readline(size)


class _Result:
    """A WSGI result yielding b"one", b"two", whose protocol methods misbehave
    as ``failure`` says; records each close()."""

    def __init__(self, failure, closes, closed):
        self.failure, self.closes, self.closed = failure, closes, closed
        self.items = [b"one", b"two"]

    def __iter__(self):
        if self.failure == "iter-raises":
            raise RuntimeError("__iter__ failed")
        return self

    def __next__(self):
        if self.failure == "first-next-raises":
            raise RuntimeError("the first next() failed")
        if not self.items:
            raise StopIteration
        item = self.items.pop(0)
        return item.decode() if self.failure == "first-item-str" else item

    def __len__(self):
        if self.failure == "len-raises":
            raise RuntimeError("__len__ failed")
        return {"len-negative": -1, "len-huge": 1 << 100, "len-float": 1.5,
                "len-str": "2"}.get(self.failure, 2)

    def close(self):
        self.closes.append(threading.get_ident())
        self.closed.set()


class _BadCloseResult(_Result):
    """A _Result whose ``close`` attribute itself raises when looked up."""

    @property
    def close(self):
        self.closes.append(threading.get_ident())
        self.closed.set()
        raise RuntimeError("the close attribute failed")


def _result_app(failure, closes, closed, result=_Result):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return result(failure, closes, closed)

    return app


def _served_by(served_on):
    """logic for make_app(): answers who served it, and records the thread."""

    def logic(req):
        served_on.append(threading.current_thread())
        digest = hashlib.sha256(req.body).hexdigest()[:16]
        return 200, [("Content-Type", "text/plain")], iter(
            [b"pid %d" % os.getpid(), b" got %d %s" % (len(req.body), digest.encode())])

    return logic


def _warm_up(kind, opener, timeout, served_on):
    """Serve one request, then wait until the thread that served it is idle
    in the worker pool (handler, wsgi-worker): the pool then has an idle
    worker and, for ASGI, the loop thread runs."""
    with opener.open("inproc://app/warm-up", data=b"w", timeout=timeout) as resp:
        assert resp.status == 200
        resp.read()
    if kind in ("handler", "wsgi-worker"):
        worker = served_on[-1]
        assert _wait_for(lambda: worker.ident in ib._workers.idle())
    return served_on[-1]


def _timed_out(exc):
    return isinstance(exc, socket.timeout) or (
        isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, socket.timeout))


# ---------------------------------------------------------------------------
# Header values and real frameworks
# ---------------------------------------------------------------------------


# Header comparisons take the caller's view (headers without Date, Server and
# hop-by-hop ones, getheader(), info(), the cookies a CookieJar kept);
# http.client strips only the leading blanks of a value.  wsgiref.validate
# refuses a tab in a header value (RFC 9110 allows it): _validated() adds the
# tab cases outside the validator.  uvicorn's h11 refuses values with outer
# whitespace, so those cases run on httptools.  Django: each test builds its
# own URL conf and waits for Django's handler to return before the bridge
# closes (else its request-body file leaks).  Framework apps are not wrapped
# in wsgiref.validate: they are not ours to fix.
def _optional(name):
    """Import a package an optional test needs: skip when it is missing, but fail when the CI
    frameworks venv runs with INPROC_BRIDGE_OPTIONAL=require."""
    if os.environ.get("INPROC_BRIDGE_OPTIONAL") == "require":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def _jar_opener(*handlers):
    """An opener with a CookieJar and no proxies, plus ``handlers``."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), *handlers)


def _seen(opener, url, timeout=WAIT, **req_kw):
    """What a caller sees of one response (an HTTPError's included), as a comparable dict;
    closes it.  ``cookies``: what the opener's CookieJar holds afterwards."""
    with _open_any(opener, urllib.request.Request(url, **req_kw), timeout) as resp:
        msg = resp.headers
        real = getattr(resp, "fp", resp) if isinstance(resp, urllib.error.HTTPError) else resp
        names = sorted({name.lower() for name, _ in msg.items()})
        seen = {
            "status": resp.getcode(),
            "reason": getattr(real, "reason", None),
            "headers": [(k, v) for k, v in msg.items() if k.lower() not in _NOT_COMPARED],
            "info": [(k, v) for k, v in resp.info().items() if k.lower() not in _NOT_COMPARED],
            "getheader": {name: real.getheader(name) for name in names  # by lower-case name
                          if name not in _NOT_COMPARED},
            "body": resp.read(),
        }
    jars = [h.cookiejar for h in opener.handlers
            if isinstance(h, urllib.request.HTTPCookieProcessor)]
    seen["cookies"] = sorted((c.name, c.value) for jar in jars for c in jar)
    return seen


def _validated(app, extra_headers=()):
    """validator(app), with ``extra_headers`` added by a shim outside the validator:
    wsgiref.validate refuses a tab in a header value, which RFC 9110 allows."""
    checked = validator(app)
    if not extra_headers:
        return checked

    def shim(environ, start_response):
        def start(status, headers, *exc_info):
            return start_response(status, headers + list(extra_headers), *exc_info)

        return checked(environ, start)

    return shim


def _wsgi_seen(app, path, kind, times=1):
    """What a caller sees of ``times`` requests for ``path``: (over wsgiref on
    loopback, in-process on ``kind``'s path), each with one CookieJar opener."""
    wire_opener, opener = _jar_opener(), _jar_opener(ib.InProcHandler({"app": app}))
    with _loopback(app) as base:
        wire = [_seen(wire_opener, base + path) for _ in range(times)]
    return wire, [_seen(opener, "inproc://app" + path, timeout=KIND_TIMEOUT[kind])
                  for _ in range(times)]


def _wire(headers):
    """What http.client makes of ``headers`` written as a server writes them."""
    block = b"".join(b"%s: %s\r\n" % (n.encode("latin-1"), v.encode("latin-1")) for n, v in headers)
    return http.client.parse_headers(io.BytesIO(block + b"\r\n")).items()


@contextlib.contextmanager
def _uvicorn_loopback(app, http="h11"):
    """Serve the ASGI ``app`` with uvicorn on 127.0.0.1 (``http``: its protocol); yield the
    base URL; stop the server and join its thread after."""
    uvicorn = _optional("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    # A listening socket handed over: requests wait in its backlog until the server is up.
    config = uvicorn.Config(app, log_level="error", log_config=None, lifespan="off", http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="uvicorn-test", daemon=True)
    thread.start()
    try:
        yield "http://127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def _django(urlpatterns):
    """(WSGI app, ASGI app) of Django serving ``urlpatterns``: settings configured once per
    process; the URL conf is these handlers' own (a module object, not in sys.modules)."""
    django = _optional("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False, SECRET_KEY="inproc-bridge-tests", ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=types.ModuleType("inproc_bridge_tests_no_urls"), MIDDLEWARE=[],
            INSTALLED_APPS=[], USE_TZ=True)
        django.setup()
    from django.core.handlers.asgi import ASGIHandler, ASGIRequest
    from django.core.handlers.wsgi import WSGIHandler, WSGIRequest

    urlconf = types.ModuleType("inproc_bridge_tests_urls")
    urlconf.urlpatterns = urlpatterns
    wsgi, asgi = WSGIHandler(), ASGIHandler()
    # Django resolves a request's URL with request.urlconf when it has one.
    wsgi.request_class = type("Request", (WSGIRequest,), {"urlconf": urlconf})
    asgi.request_class = type("Request", (ASGIRequest,), {"urlconf": urlconf})
    return wsgi, asgi


# ---------------------------------------------------------------------------
# Self-test and README
# ---------------------------------------------------------------------------


def _module_env():
    """The environment for a child Python that must import this ib."""
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(ib.__file__)))


def _run_module(*args, cwd=None):
    """``python -m inproc_bridge *args`` in a child Python: its CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "inproc_bridge", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=_module_env())


def _selftest_output(capsys, *argv):
    status = ib.main(list(argv))
    return status, capsys.readouterr().out.splitlines()


def _check_lines(lines):
    return [line for line in lines if line.startswith(("ok    ", "FAIL  "))]


def _failing(name="a check that fails on purpose"):
    def check(run):
        ib._expect(("status", 500), ("status", 200), "what the failing check looked at")

    return name, check


class _ClosedPipe:
    """A stdout whose reader has gone: every write raises BrokenPipeError."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise OSError("no file descriptor")


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


def test_module_docstring_example_runs():
    import doctest

    result = doctest.testmod(ib)
    assert result.attempted >= 3 and result.failed == 0


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
# Mounting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("apps", [{"api": _wsgi()}, None, {}], ids=["other", "None", "empty"])
def test_mount_unknown_name_raises_urlerror_naming_it(apps):
    with pytest.raises(urllib.error.URLError, match="nope"):
        _opener(apps).open("inproc://nope/")


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
    with pytest.raises(ValueError, match=r"cannot mount 'bad host/'.*a mount name is"):
        handler.mount("bad host/", _wsgi())
    for bad in ("x/y", "api@evil", "caf\u00e9", "api:99999", ""):
        with pytest.raises(ValueError, match="cannot mount"):
            handler.mount(bad, _wsgi())
        with pytest.raises(ValueError, match="cannot mount"):
            ib.OpenerFactory().mount(bad, _wsgi())
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


# ---------------------------------------------------------------------------
# Factory, source and actor
# ---------------------------------------------------------------------------


def test_factory_with_nothing_mounted_raises_bridge_error():
    with pytest.raises(ib.BridgeError):
        ib.OpenerFactory().opener_for()
    factory = ib.OpenerFactory({"api": _wsgi()})
    factory.unmount("api")
    with pytest.raises(ib.BridgeError):
        factory.opener_for()


def test_factory_opener_tags_source_and_actor(app_kind, kind_timeout):
    """The app of an opener made for an actor and a source sees both, in
    current_source() and current_actor() and in environ (WSGI) or the
    scope's inproc extension (ASGI); the caller's context keeps neither."""
    seen = []

    def logic(req):
        seen.append((ib.current_source(), ib.current_actor()))
        if app_kind != "handler":
            seen.append(req.tags)
        return 200, [("Content-Type", "text/plain")], [b"x"]

    with ib.OpenerFactory({"api": make_app(app_kind, logic)}) as factory:
        opener = factory.opener_for(actor="user-7", source=ib.SOURCE_AGENTS)
        with opener.open("inproc://api/", timeout=kind_timeout) as resp:
            resp.read()
    assert set(seen) == {("agents", "user-7")}
    assert len(seen) == (1 if app_kind == "handler" else 2)
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


def test_factory_openers_have_urllibs_https_handler_with_its_tls_settings():
    factory = ib.OpenerFactory({"api": _wsgi()})
    first, second = factory.opener_for(), factory.opener_for(actor="other")
    (one,), (two,) = _https_handlers(first), _https_handlers(second)
    (plain,) = _https_handlers(urllib.request.build_opener())
    assert one is not two and one.parent is first and two.parent is second
    # The one SSL context urllib's default HTTPSHandler() makes (3.12+; None
    # before, as in urllib), shared by the factory's openers.
    assert (one._context is None) == (plain._context is None)
    assert one._context is two._context
    assert _tls_settings(one._context) == _tls_settings(plain._context)


def test_factory_openers_see_a_changed_ca_environment(monkeypatch, tmp_path):
    factory = ib.OpenerFactory({"api": _wsgi()})
    (before,) = _https_handlers(factory.opener_for())
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    (after,) = _https_handlers(factory.opener_for())
    (again,) = _https_handlers(factory.opener_for())
    if before._context is not None:  # 3.12+: one context per environment
        assert after._context is not before._context
        assert again._context is after._context


@pytest.mark.parametrize("given", ["instance", "class"])
def test_factory_opener_keeps_the_callers_https_handler(given):
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    mine = urllib.request.HTTPSHandler(context=context)
    opener = ib.OpenerFactory({"api": _wsgi()}).opener_for(
        mine if given == "instance" else urllib.request.HTTPSHandler)
    handlers = _https_handlers(opener)
    assert len(handlers) == 1
    if given == "instance":
        assert handlers[0] is mine and handlers[0]._context is context


def _opener_shape(opener):
    """What build_opener() decides for an opener: its handlers' classes in
    order, who handles what, and the default headers."""
    def chain(handlers):
        return [type(h).__name__ for h in handlers]

    return (chain(opener.handlers),
            {k: chain(v) for k, v in opener.handle_open.items()},
            {k: {code: chain(v) for code, v in d.items()} for k, d in opener.handle_error.items()},
            {k: chain(v) for k, v in opener.process_request.items()},
            {k: chain(v) for k, v in opener.process_response.items()}, opener.addheaders)


def _opener_chains(opener):
    yield opener.handlers
    for registry in (opener.handle_open, opener.process_request, opener.process_response):
        yield from registry.values()
    for by_code in opener.handle_error.values():
        yield from by_code.values()


def _plain_state(handler):
    return {k: v for k, v in vars(handler).items()
            if k not in ("parent", "_context", "_mounts", "_owns_mounts", "actor", "source",
                         "calls") and not callable(v)}


def test_factory_opener_is_the_opener_build_opener_makes(monkeypatch):
    """opener_for() copies one opener instead of running build_opener() each
    time; every copy has the same handlers, registered the same way, as
    build_opener() gives, all of them its own."""
    _icpt_no_proxies(monkeypatch)
    monkeypatch.setenv("ftp_proxy", "http://127.0.0.1:%d" % _icpt_dead_port())
    factory = ib.OpenerFactory({"api": _wsgi()})
    first, second = factory.opener_for(), factory.opener_for(actor="b", source="s")
    built = urllib.request.build_opener(ib.InProcHandler({"x": _wsgi()}))
    assert _opener_shape(first) == _opener_shape(second) == _opener_shape(built)
    assert {id(h) for h in first.handlers}.isdisjoint(id(h) for h in second.handlers)
    for opener in (first, second):
        own = {id(h) for h in opener.handlers}
        assert all(id(h) in own for chain in _opener_chains(opener) for h in chain)
        assert all(h.parent is opener for h in opener.handlers)
    for mine, theirs in zip(second.handlers, built.handlers):
        assert _plain_state(mine) == _plain_state(theirs)
    (bridge,) = [h for h in second.handlers if isinstance(h, ib.InProcHandler)]
    assert (bridge.actor, bridge.source) == ("b", "s")
    (proxy,) = [h for h in second.handlers if isinstance(h, urllib.request.ProxyHandler)]
    assert proxy.proxies == {"ftp": os.environ["ftp_proxy"]}
    # Nothing one opener is given reaches another.
    first.addheaders.append(("X-Only", "first"))
    first.add_handler(urllib.request.HTTPCookieProcessor())
    assert _opener_shape(second) == _opener_shape(built)
    with second.open("inproc://api/") as resp:
        assert resp.read() == b"ok"


def test_factory_openers_read_the_proxy_environment_each_time(monkeypatch):
    """As a new build_opener() does: an opener made after http_proxy was set
    sends http:// URLs there; one made before does not."""
    _icpt_no_proxies(monkeypatch)
    factory = ib.OpenerFactory({"api": _wsgi()})
    before = factory.opener_for()
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:%d" % _icpt_dead_port())
    after = factory.opener_for()
    assert _opener_shape(after) == _opener_shape(urllib.request.build_opener(
        ib.InProcHandler({"x": _wsgi()})))
    old, (new,) = ([h for h in o.handlers if isinstance(h, urllib.request.ProxyHandler)]
                   for o in (before, after))
    assert old == []  # build_opener() keeps a ProxyHandler only when it has proxies
    assert new.proxies == {"http": os.environ["http_proxy"]}
    with pytest.raises(urllib.error.URLError) as info:
        after.open("http://proxied.test/", timeout=WAIT)
    assert isinstance(info.value.reason, ConnectionRefusedError)  # it went to the proxy
    for opener in (before, after):
        with opener.open("inproc://api/") as resp:
            assert resp.read() == b"ok"


def test_factory_opener_reads_the_proxy_environment_once_per_opener(monkeypatch):
    """An environment that changes while an opener is being made gives it
    one reading, not two (its proxies and its registrations agree)."""
    _icpt_no_proxies(monkeypatch)
    proxy = "http://127.0.0.1:%d" % _icpt_dead_port()
    monkeypatch.setenv("http_proxy", proxy)
    real, calls = urllib.request.getproxies, []

    def getproxies():
        calls.append(None)
        found = real()
        if len(calls) == 1:
            os.environ.pop("http_proxy")  # changes just after the first reading
        return found

    monkeypatch.setattr(urllib.request, "getproxies", getproxies)
    factory = ib.OpenerFactory({"api": _wsgi()})
    opener = factory.opener_for()
    (handler,) = [h for h in opener.handlers if isinstance(h, urllib.request.ProxyHandler)]
    assert handler.proxies == {"http": proxy}
    assert handler in opener.handle_open["http"]
    monkeypatch.setattr(urllib.request, "getproxies", real)
    monkeypatch.setenv("http_proxy", proxy)
    again = factory.opener_for()
    assert _opener_shape(again) == _opener_shape(urllib.request.build_opener(
        ib.InProcHandler({"x": _wsgi()})))
    with pytest.raises(urllib.error.URLError) as info:
        again.open("http://proxied.test/", timeout=WAIT)
    assert isinstance(info.value.reason, ConnectionRefusedError)


def test_factory_opener_follows_http_client_debuglevel(monkeypatch):
    """3.12+ HTTP handlers take http.client's debuglevel when made: a later
    change reaches a new opener as it reaches a new build_opener()."""
    factory = ib.OpenerFactory({"api": _wsgi()})
    factory.opener_for()
    monkeypatch.setattr(http.client.HTTPConnection, "debuglevel", 1)
    monkeypatch.setattr(http.client.HTTPSConnection, "debuglevel", 1)

    def levels(opener):
        return sorted((type(h).__name__, h._debuglevel) for h in opener.handlers
                      if isinstance(h, urllib.request.AbstractHTTPHandler))

    assert levels(factory.opener_for()) == levels(urllib.request.build_opener())


def test_factory_opener_registers_a_method_added_to_a_urllib_handler(monkeypatch):
    """build_opener() registers handlers' methods by name when it runs: a
    method added to one of its classes later is registered in new openers."""
    factory = ib.OpenerFactory({"api": _wsgi()})
    factory.opener_for()
    monkeypatch.setattr(urllib.request.HTTPErrorProcessor, "ftp_response",
                        lambda self, req, resp: resp, raising=False)
    opener = factory.opener_for()
    assert "ftp" in opener.process_response
    assert _opener_shape(opener) == _opener_shape(urllib.request.build_opener(
        ib.InProcHandler({"x": _wsgi()})))


def test_factory_opener_calls_a_replaced_build_opener(monkeypatch):
    calls = []
    real = urllib.request.build_opener

    def build_opener(*handlers):
        calls.append(handlers)
        return real(*handlers)

    factory = ib.OpenerFactory({"api": _wsgi()})
    factory.opener_for()
    monkeypatch.setattr(urllib.request, "build_opener", build_opener)
    for _ in range(2):
        with factory.opener_for().open("inproc://api/") as resp:
            assert resp.read() == b"ok"
    assert len(calls) == 2  # one per opener, as a mock of build_opener expects


def test_factory_opener_takes_a_replaced_urllib_handler_class(monkeypatch):
    """A program that replaced one of urllib's handler classes gets it in
    the factory's openers too, as build_opener() looks them up by name."""
    class Mine(urllib.request.HTTPHandler):
        pass

    factory = ib.OpenerFactory({"api": _wsgi()})
    factory.opener_for()
    monkeypatch.setattr(urllib.request, "HTTPHandler", Mine)
    assert any(type(h) is Mine for h in factory.opener_for().handlers)


def test_context_helpers_outside_a_request():
    assert ib.current_source() is None
    assert ib.current_actor() is None
    with pytest.raises(RuntimeError):
        ib.cancelled()


# ---------------------------------------------------------------------------
# Response: status, headers, bodies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_status_reason_and_headers_pass_through(app_kind, kind_timeout):
    body = b"I'm a teapot, short and stout"
    logic = _answer("418 I'm a teapot", [("Content-Type", "text/plain"), ("X-Tea", "earl grey"),
                                         ("X-Tea", "green"), ("Content-Length", str(len(body)))],
                    body)
    with serve_kind(app_kind, logic, "api") as (opener, timeout), _http_error(418) as info:
        opener.open("inproc://api/pot", timeout=timeout)
    err = info.value
    assert err.reason == "I'm a teapot" and err.d_body == body
    assert err.headers.get_all("X-Tea") == ["earl grey", "green"]


def test_response_surface_is_httpresponse(app_kind):
    body = b"line one\nline two\nline three\n"

    def logic(req):
        return 200, [("Content-Type", "text/plain")], [body[:9], body[9:]]

    with serve_kind(app_kind, logic, "api") as (opener, timeout):
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
            assert ("Content-Type", "text/plain") in resp.getheaders()
            assert resp.readlines() == [b"line three\n"]
            assert resp.read() == b""


def test_no_body_for_head_204_304(app_kind):
    """HEAD, 204 and 304 end with no body, though the app sends one (a
    handler class with a Content-Length or an ASGI app sends its body
    whatever the method); a 404 is an HTTPError with its reason and body; a
    302 is followed."""
    codes = {"/missing": 404, "/empty": 204, "/not-modified": 304, "/old": 302}

    def logic(req):
        code = codes.get(req.target, 200)
        body = b"body of %d" % code
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        if code in (204, 304):
            # Only an ASGI app may send a body the status forbids: the bridge drops it.
            return code, [], [body] if app_kind == "asgi" else []
        return code, [*headers, *([("Location", "/new")] if code == 302 else [])], [body]

    with serve_kind(app_kind, logic, "api") as (opener, timeout):
        req = urllib.request.Request("inproc://api/", method="HEAD")
        with opener.open(req, timeout=timeout) as resp:
            assert resp.status == 200 and resp.read() == b""
            assert resp.getheader("Content-Length") == "11"
        with opener.open("inproc://api/empty", timeout=timeout) as resp:
            assert resp.status == 204 and resp.read() == b""
        with _http_error(304) as info:
            opener.open("inproc://api/not-modified", timeout=timeout)
        assert info.value.d_body == b""
        with _http_error(404) as info:
            opener.open("inproc://api/missing", timeout=timeout)
        assert info.value.reason == "Not Found" and info.value.d_body == b"body of 404"
        with opener.open("inproc://api/old", timeout=timeout) as resp:
            assert resp.url == "inproc://api/new" and resp.read() == b"body of 200"


def test_handler_framings_are_decoded():
    payload = b"".join(b"%05d," % n for n in range(2000))
    # make_app's handler class frames a body without a Content-Length itself, chunked.
    chunked = make_app("handler", lambda req: (
        200, [], (payload[i:i + 3000] for i in range(0, len(payload), 3000))))
    answer = make_app("handler", lambda req: (
        200, [("Content-Length", str(len(req.body)))], [req.body[::-1]]))

    class CloseDelimited(QuietHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            for start in range(0, len(payload), 777):
                self.wfile.write(payload[start:start + 777])

    opener = _opener({"chunked": chunked, "close": CloseDelimited, "continue": answer})
    for name in ("chunked", "close"):
        with opener.open("inproc://%s/" % name) as resp:
            assert resp.read() == payload
    expect = {"Expect": "100-continue"}
    req = urllib.request.Request("inproc://continue/", data=b"abc", headers=expect)
    with opener.open(req) as resp:
        assert resp.status == 200 and resp.read() == b"cba"


def test_response_header_values_match_loopback(app_kind):
    # Every kind against a handler class served over a real socket: the values http.client
    # parsed off the wire.  make_app() wraps WSGI apps in wsgiref.validate, which refuses
    # tabs in values: those kinds go without the tab cases (see the wsgiref test for them).
    tabs = [] if app_kind.startswith("wsgi") else _TAB_HEADERS
    headers = [("Content-Type", "text/plain"), *_TRICKY_HEADERS, *tabs, ("Content-Length", "2")]
    logic = _answer(200, headers, b"ok")
    with _loopback(make_app("handler", logic)) as base:
        wire = _seen(_jar_opener(), base + "/h")
    with serve_kind(app_kind, logic) as (opener, timeout):
        bridge = [h for h in opener.handlers if isinstance(h, ib.InProcHandler)]
        got = _seen(_jar_opener(*bridge), "inproc://app/h", timeout=timeout)
    assert got == wire
    assert ("Set-Cookie", "csrftoken=abc123; Path=/; SameSite=Lax") in got["headers"]
    assert got["cookies"] == [("csrftoken", "abc123"), ("sessionid", "s3cr3t")]


@pytest.mark.parametrize("kind", ["wsgi-inline", "wsgi-worker"])
def test_wsgi_header_values_match_wsgiref_over_loopback(kind):
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/cookie":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [environ.get("HTTP_COOKIE", "").encode("latin-1")]
        start_response("200 OK", [("Content-Type", "text/plain"), *_TRICKY_HEADERS])
        return [b"ok"]

    app = _validated(app, _TAB_HEADERS)
    wire_opener = _jar_opener()
    with _loopback(app) as base:
        wire = [_seen(wire_opener, base + "/"), _seen(wire_opener, base + "/cookie")]
    opener = _jar_opener(ib.InProcHandler({"app": app}))
    got = [_seen(opener, "inproc://app/", timeout=KIND_TIMEOUT[kind]),
           _seen(opener, "inproc://app/cookie", timeout=KIND_TIMEOUT[kind])]
    assert got == wire
    first = got[0]
    # No Content-Length: wsgiref.validate's iterator has no len(), on either side.
    assert first["headers"] == list(_wire([("Content-Type", "text/plain"), *_TRICKY_HEADERS,
                                           *_TAB_HEADERS]))
    assert first["getheader"]["set-cookie"] == (
        "csrftoken=abc123; Path=/; SameSite=Lax, sessionid=s3cr3t; HttpOnly; Path=/ ")
    assert first["getheader"]["x-spaces"] == "" and first["getheader"]["x-trail"] == "trail  "
    assert first["cookies"] == [("csrftoken", "abc123"), ("sessionid", "s3cr3t")]
    assert got[1]["body"] == b"csrftoken=abc123; sessionid=s3cr3t"


def test_asgi_header_values_match_the_wsgi_path():
    headers = [("Content-Type", "text/plain"), *_TRICKY_HEADERS, *_TAB_HEADERS]

    async def asgi_app(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        await _send(send, b"ok", headers=[(n.encode("latin-1"), v.encode("latin-1"))
                                          for n, v in headers])

    def wsgi_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), *_TRICKY_HEADERS])
        return [b"ok"]

    with Bridge({"asgi": asgi_app}) as (_, bridge):
        bridge.mount("wsgi", _validated(wsgi_app, _TAB_HEADERS))
        asgi = _seen(_jar_opener(bridge), "inproc://asgi/", timeout=WAIT)
        wsgi = _seen(_jar_opener(bridge), "inproc://wsgi/", timeout=None)
    assert asgi == wsgi
    assert asgi["headers"] == list(_wire(headers))
    assert asgi["cookies"] == [("csrftoken", "abc123"), ("sessionid", "s3cr3t")]


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------


def test_stream_lockstep_events(app_kind):
    """Each event reaches the caller before the app makes the next (it waits
    for the caller's go): lock-step, then a clean end.  open() returns on the
    head, before any event is made -- except under WSGI, whose head leaves
    with the first body bytes."""
    go, ended = threading.Semaphore(0), threading.Event()
    produced = []
    head_first = app_kind not in WSGI_KINDS

    def logic(req):
        def events():
            for n in range(5):
                if not go.acquire(timeout=WAIT):
                    return
                produced.append(n)
                yield b"data: %d\n\n" % n
            ended.set()

        return 200, [("Content-Type", "text/event-stream")], events()

    with serve_kind(app_kind, logic, "api") as (opener, timeout):
        if not head_first:
            go.release()
        with opener.open("inproc://api/events", timeout=timeout) as resp:
            assert resp.getheader("Content-Type") == "text/event-stream"
            assert produced == ([] if head_first else [0])
            for n in range(5):
                if head_first or n:
                    go.release()
                assert resp.readline() == b"data: %d\n" % n
                assert resp.readline() == b"\n"
                assert produced == list(range(n + 1))  # the next one waits for us
            assert resp.read() == b""
        assert ended.wait(WAIT), "the app did not reach its end"


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


def test_asgi_backpressure_holds_a_fast_app_back():
    record, done = {}, threading.Event()

    async def fast(scope, receive, send):
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(64):
            await send({"type": "http.response.body", "body": b"%063d\n" % i * 1024,
                        "more_body": True})
            record["sent"] = i
        await send({"type": "http.response.body", "body": b""})
        done.set()

    with Bridge({"api": fast}) as (opener, _):
        with opener.open("inproc://api/", timeout=WAIT) as resp:
            first = resp.read(64)
            assert first == b"%063d\n" % 0
            # 64 chunks of 64 KiB = 4 MiB; the pipe holds 1 MiB.
            assert not done.is_set() and record["sent"] < 63
            rest = resp.read()
        assert len(first) + len(rest) == 64 * 64 * 1024
        assert done.wait(WAIT)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
# An app's failure, its bad output or a caller's bad input: a clear error, nothing
# lost, nothing hung.


def test_error_before_response_is_500_and_logged(app_kind, kind_timeout, caplog):
    def logic(req):
        raise ZeroDivisionError("kaput")

    with ib.InProcHandler({"api": make_app(app_kind, logic)}, source="billing") as bridge:
        with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
            with _http_error(500) as info:
                urllib.request.build_opener(bridge).open("inproc://api/", timeout=kind_timeout)
            assert info.value.d_body == ib._ERROR_BODY
    records = [r for r in caplog.records if r.name == "inproc_bridge"]
    assert len(records) == 1
    assert "billing" in records[0].getMessage()
    assert records[0].exc_info[0] is ZeroDivisionError
    assert records[0].inproc_source == "billing"


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
    for reader in ("readall", "read", "readline", "readinto"):
        with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"):
            with opener.open("inproc://api/") as resp:
                with pytest.raises((OSError, http.client.HTTPException)):
                    while _read_once(resp, reader, 3) and reader != "readall":
                        pass


@pytest.mark.parametrize("reader", ["read", "read_amt"])
def test_error_after_first_chunk_makes_body_read_raise(app_kind, reader, caplog):
    """An app that fails after its first chunk: the caller's read raises a
    ConnectionResetError naming the app's error, which is logged; the app's
    result is closed."""
    closed = []

    class Body:
        def __iter__(self):
            yield b"first"
            raise ValueError("midway")

        def close(self):
            closed.append(True)

    def logic(req):
        return 200, [("Content-Type", "text/plain")], Body()

    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        with serve_kind(app_kind, logic, "api") as (opener, timeout):
            with opener.open("inproc://api/", timeout=timeout) as resp:
                with pytest.raises(ConnectionResetError, match="ValueError: midway"):
                    if reader == "read":
                        resp.read()
                    while resp.read(2):
                        pass
    assert closed == [True]
    assert any(r.exc_info and r.exc_info[0] is ValueError for r in caplog.records)


def test_error_after_first_chunk_whose_str_fails_still_reaches_the_reader(app_kind, caplog):
    # The error the reader gets names the app's; one whose str() fails must
    # not stop it on its way (the caller then waited out its timeout, or for
    # ever without one): as in a traceback, its type stands for it.
    class Unprintable(AppFault):
        def __str__(self):
            raise RuntimeError("this error has no text")

    def logic(req):
        def body():
            yield FIRST
            raise Unprintable()

        return 200, [("Content-Type", "text/plain")], body()

    with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"):
        with serve_kind(app_kind, logic, "api") as (opener, timeout):
            with opener.open("inproc://api/", timeout=timeout) as resp:
                assert resp.read(len(FIRST)) == FIRST
                with pytest.raises(ConnectionResetError, match="Unprintable: <str"):
                    resp.read()


@pytest.mark.parametrize("failure", ["short", "raise"])
def test_error_response_with_a_broken_body_is_httperror_first(app_kind, failure, caplog):
    # As over TCP: open() raises HTTPError at once; only reading its body fails.
    def logic(req):
        def body():
            yield b"partial"
            if failure == "raise":
                raise RuntimeError("midway")

        return 500, [("Content-Type", "text/plain"), ("Content-Length", "100")], body()

    with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"):
        with serve_kind(app_kind, logic, "api") as (opener, timeout):
            with pytest.raises(urllib.error.HTTPError) as info:
                opener.open("inproc://api/", timeout=timeout)
            with info.value as err:
                assert err.code == 500
                with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
                    err.read()


def test_error_response_whose_body_comes_late_is_httperror_at_once():
    release = threading.Event()

    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.flush()
        release.wait(WAIT)  # the body waits until the caller has its HTTPError
        self.wfile.write(b"later")

    opener = _opener({"api": _handler(do_GET=do_GET)})
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open("inproc://api/", timeout=WAIT)
    finally:
        release.set()
    with info.value as err:
        assert err.code == 503 and err.read() == b"later"


def test_error_wsgi_app_raising_broken_pipe_itself_is_an_app_error(caplog):
    # Its own BrokenPipeError (say, from an upstream) is a failure to report,
    # not its caller leaving: the read raises at once, no timeout wait.
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first,"
        raise BrokenPipeError("upstream connection broke")

    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        for timeout in (None, WAIT):
            with _opener({"api": validator(app)}).open("inproc://api/", timeout=timeout) as resp:
                with pytest.raises(ConnectionResetError, match="upstream"):
                    resp.read()
    assert len([r for r in caplog.records if r.name == "inproc_bridge"]) == 2  # both logged


def test_error_handler_returning_without_response_is_200_empty():
    def do_GET(self):
        pass

    with _opener({"api": _handler(do_GET=do_GET)}).open("inproc://api/") as resp:
        assert resp.status == 200 and resp.read() == b""


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_error_wsgi_without_start_response_is_500(kind_timeout, caplog):
    def app(environ, start_response):
        return []

    with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"), _http_error(500):
        _opener({"api": app}).open("inproc://api/", timeout=kind_timeout)


def test_error_send_error_reaches_the_caller():
    def do_GET(self):
        self.send_error(404, "No such thing", "explained")

    with _http_error(404) as info:
        _opener({"api": _handler(do_GET=do_GET)}).open("inproc://api/")
    assert info.value.reason == "No such thing" and b"explained" in info.value.d_body


def test_asgi_no_response_is_a_500(caplog):
    async def silent(scope, receive, send):
        assert scope["type"] == "http"
        return None

    async def unfinished(scope, receive, send):
        assert scope["type"] == "http"
        await _send(send, b"half", 200, [(b"content-type", b"text/plain")], more=True)

    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        with Bridge({"silent": silent, "unfinished": unfinished}) as (opener, _):
            with _http_error(500):
                opener.open("inproc://silent/", timeout=WAIT)
            with opener.open("inproc://unfinished/", timeout=WAIT) as resp, pytest.raises(OSError):
                resp.read()
    messages = " ".join(r.getMessage() + str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert "http.response.start" in messages and "more_body" in messages


def test_asgi_protocol_errors_in_send():
    results = {}

    def make(messages, key):
        async def app(scope, receive, send):
            assert scope["type"] == "http"
            try:
                for message in messages:
                    await send(message)
            except Exception as exc:
                results[key] = exc
                raise

        return app

    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]}
    apps = {
        "body-first": make([{"type": "http.response.body", "body": b"x"}], "body-first"),
        "bad-header": make([{"type": "http.response.start", "status": 200,
                             "headers": [(b"x", b"a\r\nb")]}], "bad-header"),
        "str-header": make([{"type": "http.response.start", "status": 200,
                             "headers": [("x", "y")]}], "str-header"),
        "bad-status": make([{"type": "http.response.start", "status": "200"}], "bad-status"),
        "too-long": make([start, {"type": "http.response.body", "body": b"abcd"}], "too-long"),
    }
    with Bridge(apps) as (opener, _):
        for name in ("body-first", "bad-header", "str-header", "bad-status"):
            with _http_error(500):
                opener.open("inproc://%s/" % name, timeout=WAIT)
        with opener.open("inproc://too-long/", timeout=WAIT) as resp, pytest.raises(OSError):
            resp.read()
    assert isinstance(results["body-first"], RuntimeError)
    assert isinstance(results["bad-header"], ValueError)
    assert isinstance(results["str-header"], TypeError)
    assert isinstance(results["bad-status"], ValueError)
    assert isinstance(results["too-long"], RuntimeError)


@pytest.mark.parametrize("lengths, body", [
    ([b"two"], b"ok"), ([b"\xb2"], b"ok"), ([b"-2"], b"ok"), ([b"2"], b"ok"),
    ([b"2", b"5"], b"hello"), ([b"5", b"2"], b"ok"), ([b"2", b"2"], b"ok"),
], ids=["word", "superscript", "negative", "one", "first-shorter", "first-longer", "same-twice"])
def test_asgi_content_length_no_number_or_in_conflict_is_refused_in_send(lengths, body):
    # uvicorn refuses such a head (h11 and httptools alike: the connection
    # drops); in-process send() raises, so the caller gets the 500 -- not the
    # body cut at the first length, nor read to the end past a length that
    # no server sent.
    raised = []

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", n) for n in lengths]})
        except ValueError as exc:
            raised.append(exc)
            raise
        await send({"type": "http.response.body", "body": body})

    with Bridge({"api": app}) as (opener, _):
        if len(set(lengths)) == 1 and lengths[0].isdigit():
            with opener.open("inproc://api/", timeout=WAIT) as resp:
                assert resp.read() == body and not raised
            return
        with _http_error(500):
            opener.open("inproc://api/", timeout=WAIT)
    assert len(raised) == 1


@pytest.mark.parametrize("url, error, words", [
    ("inproc:///x", urllib.error.URLError, "no host given"),
    *((url, urllib.error.URLError, "api")
      for url in ["inproc://api:abc/", "inproc://api:99999/", "inproc://api:-1/"]),
    *((url, ib.BridgeError, "ASCII")
      for url in ["inproc://\u00e4pi/", "inproc://api\u0131/", "inproc://\u0430pi/"]),
])
def test_badinput_bad_host_or_port_is_refused(url, error, words):
    opener = _opener({"api": make_app("wsgi-inline", _never_called)})
    with pytest.raises(error) as info:
        opener.open(url)
    assert words in str(info.value)


def test_badinput_str_data_is_typeerror_as_urllib_gives(app_kind, kind_timeout):
    with Bridge({"api": make_app(app_kind, _never_called)}) as (opener, _):
        with pytest.raises(TypeError) as info:
            opener.open("inproc://api/", data="text", timeout=kind_timeout)
    # The same words urllib uses for http://
    with pytest.raises(TypeError) as http_info:
        urllib.request.build_opener().open("http://127.0.0.1:9/", data="text")
    assert str(info.value) == str(http_info.value)


def test_badinput_str_items_in_body_iterable_are_typeerror(app_kind, kind_timeout, worker_pool):
    probe = Probe()

    def run():
        req = urllib.request.Request("inproc://api/", data=iter([b"bytes", "text"]), method="POST")
        opener.open(req, timeout=kind_timeout).close()

    with Bridge({"api": make_app(app_kind, lambda req: (204, [], []), probe)}) as (opener, _):
        with pytest.raises(TypeError):
            _call(run)
        _assert_no_app_left(probe)
    _assert_threads_back(worker_pool)


@pytest.mark.parametrize("url, error", [
    ("inproc://api/a b", http.client.InvalidURL),
    ("inproc://api/a\x7fb", http.client.InvalidURL),
    ("inproc://api/\x00", http.client.InvalidURL),
    ("inproc://api/a\r\nb", http.client.InvalidURL),
    ("inproc://api/caf\u00e9", UnicodeEncodeError),
], ids=["space", "del", "nul", "crlf", "non-ascii"])
def test_badinput_control_characters_in_url_are_refused(app_kind, kind_timeout, url, error):
    with Bridge({"api": make_app(app_kind, _never_called)}) as (opener, _), pytest.raises(error):
        opener.open(url, timeout=kind_timeout)


class _BytesSocket:
    """The socket stock http.client reads a response from: these bytes, then EOF."""

    def __init__(self, data):
        self._data = data

    def makefile(self, mode="rb"):
        return io.BufferedReader(io.BytesIO(self._data))


def _head_view(resp):
    """What a caller can learn from a response's head, and then its body."""
    view = [resp.status, resp.reason, resp.version, resp.headers.items(), resp.length,
            resp.chunked, resp.will_close]
    try:
        view.append(resp.read())
    except Exception as exc:
        view.append(type(exc))
    return view


# Most end as a response usually does: a two-byte body with its Content-Length.
_OK = b"Content-Length: 2\r\n\r\nok"
_HEADS = {
    "plain": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A:  lead\r\nX-B: trail  \r\n\r\nok",
    "no-space": b"HTTP/1.1 200 OK\r\nX-A:v\r\nX-T:\tv\r\n" + _OK,
    "http-1.0-close": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end",
    "http-1.0-keep-alive": b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\n" + _OK,
    "http-1.0-connection": b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n" + _OK,
    "http-1.0-proxy": b"HTTP/1.0 200 OK\r\nProxy-Connection: keep-alive\r\n" + _OK,
    "http-1.1-close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n" + _OK,
    "http-1.2": b"HTTP/1.2 200 OK\r\n" + _OK,
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n" + _OK,
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nok",
    "bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: two\r\n\r\nto the end",
    "negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nto the end",
    "no-reason": b"HTTP/1.1 204\r\n\r\n",
    "spaced-reason": b"HTTP/1.1 200  Very   OK \r\nContent-Length: 0\r\n\r\n",
    "not-modified": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    "empty-values": b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Spaces:   \r\n" + _OK,
    "obs-text": b"HTTP/1.1 200 OK\r\nX-O: caf\xe9\r\n" + _OK,
    "two-cookies": b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie:  b=2\r\n" + _OK,
    # What the fast path leaves to http.client, which must then decide as always.
    "continue-first": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n" + _OK,
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n" + _OK,
    "lf-only": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "name-not-a-token": b"HTTP/1.1 200 OK\r\nX(y): 1\r\n" + _OK,
    "space-before-colon": b"HTTP/1.1 200 OK\r\nX-A : v\r\n" + _OK,
    "status-extra-spaces": b"HTTP/1.1  200 OK\r\n" + _OK,
    "bare-cr": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n" + _OK,
    "head-over-8k": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\n" + _OK,
    "too-many-headers": b"HTTP/1.1 200 OK\r\n" + b"X-N: 1\r\n" * 101 + b"\r\n",
    # http.client counts the blank line that ends a head: 100 fields are too many.
    "99-fields": b"HTTP/1.1 200 OK\r\n" + b"X-N: 1\r\n" * 98 + _OK,
    "100-fields": b"HTTP/1.1 200 OK\r\n" + b"X-N: 1\r\n" * 99 + _OK,
    "http-0.9": b"HTTP/0.9 200 OK\r\n" + _OK,
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("name", sorted(_HEADS))
def test_response_handler_head_reads_as_http_client_reads_it(name, method):
    raw = _HEADS[name]
    stock = http.client.HTTPResponse(_BytesSocket(raw), method=method)
    try:
        stock.begin()
    except http.client.HTTPException as exc:
        want = type(exc)
    else:
        want = _head_view(stock)
    # An opener with the bridge alone: no processor turns a status into an
    # HTTPError, so the caller sees the response as http.client made it.
    opener = urllib.request.OpenerDirector()
    opener.add_handler(ib.InProcHandler({"raw": _raw_handler(None, raw, "HTTP/1.0")}))
    try:
        resp = opener.open(urllib.request.Request("inproc://raw/", method=method), timeout=WAIT)
    except http.client.HTTPException as exc:
        got = type(exc)
    else:
        with resp:
            got = _head_view(resp)
    assert got == want


@pytest.mark.parametrize("raw, error", [
    *((raw, http.client.HTTPException) for raw in [
        b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n",
        b"\x00\xff\xfe\r\n\r\n", b"ICY 200 OK\r\n\r\n"]),
    (b"HTTP/1.1 200 " + b"O" * 70000 + b"\r\n\r\n", http.client.LineTooLong),
], ids=["garbage", "status-abc", "status-2000", "binary", "icy", "oversized-status-line"])
def test_badinput_handler_non_http_bytes_raise_httpexception(raw, error, worker_pool):
    probe = Probe()
    opener = _opener({"api": _raw_handler(probe, raw)})
    with pytest.raises(error):
        _call(lambda: opener.open("inproc://api/").close())
    assert probe.wait_finished()
    _assert_threads_back(worker_pool)


@pytest.mark.parametrize("headers, error", [
    ([("X-Big", "v" * 70000)], http.client.LineTooLong),
    ([("X-H%d" % i, "v") for i in range(101)], http.client.HTTPException),
], ids=["oversized-linetoolong", "too-many-httpexception"])
@pytest.mark.parametrize("app_kind", ["handler", "wsgi-inline", "wsgi-worker"])
def test_badinput_bad_response_headers_are_refused(app_kind, headers, error, worker_pool):
    probe = Probe()
    logic = _answer(headers=[("Content-Type", "text/plain"), *headers, ("Content-Length", "2")],
                    body=b"ok")
    opener = _opener({"api": make_app(app_kind, logic, probe)})
    with pytest.raises(error):
        _call(lambda: opener.open("inproc://api/", timeout=_timeout_for(app_kind)).close())
    assert probe.wait_finished()
    _assert_threads_back(worker_pool)


def test_badinput_a_head_of_100_fields_is_refused_as_http_client_refuses_it(app_kind):
    # http.client refuses a head once its lines, the blank one that ends it
    # included, pass 100: 99 fields are read, 100 are refused -- counted as
    # the caller would see them, the server's own Date (and Server) included.
    def logic(req):
        extra = int(req.query or 0)
        return 200, [("Content-Type", "text/plain"), *[("X-H%d" % i, "v") for i in range(extra)],
                     ("Content-Length", "2")], [b"ok"]

    with serve_kind(app_kind, logic, "api") as (opener, timeout):
        with opener.open("inproc://api/", timeout=timeout) as resp:
            base = len(resp.headers)
        with opener.open("inproc://api/?%d" % (99 - base), timeout=timeout) as resp:
            assert len(resp.headers) == 99 and resp.read() == b"ok"
        with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
            opener.open("inproc://api/?%d" % (100 - base), timeout=timeout).close()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_badinput_handler_writes_after_response_complete(framing, worker_pool):
    probe = Probe()
    junk = b"J" * PIECE

    def keep_writing(handler):
        try:
            for _ in range(64):  # 4 MiB: more than a pipe holds
                handler.wfile.write(junk)
        except OSError as exc:
            probe.note("late-write", type(exc))
        else:
            probe.note("late-write", None)

    if framing == "length":
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    else:
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    opener = _opener({"api": _raw_handler(probe, raw, then=keep_writing)})

    def run():
        with opener.open("inproc://api/") as resp:
            return resp.status, resp.read()

    assert _call(run) == (200, b"hello")
    assert probe.wait_finished(), "the handler hung writing after its response"
    (late,) = probe.details("late-write")
    assert late in (None, BrokenPipeError), late
    _assert_threads_back(worker_pool)


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_badinput_wsgi_write_after_response_complete(app_kind, worker_pool):
    probe, holder = Probe(), {}

    def app(environ, start_response):
        holder["write"] = start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hel", b"lo"]

    def write_late():
        try:
            holder["write"](b"late")
        except Exception as exc:  # an error is an acceptable answer
            probe.note("late-write", type(exc))
        else:
            probe.note("late-write", None)

    opener = _opener({"api": _tracked_wsgi(app, probe, on_close=write_late)})

    def run():
        with opener.open("inproc://api/", timeout=_timeout_for(app_kind)) as resp:
            return resp.status, resp.read()

    assert _call(run) == (200, b"hello")
    assert probe.wait_finished()
    assert len(probe.details("late-write")) == 1
    _assert_threads_back(worker_pool)


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_badinput_start_response_twice_is_500(app_kind, caplog):
    probe = Probe()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"never"]

    opener = _opener({"api": _tracked_wsgi(app, probe)})
    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        code, body = _expect_500(opener, app_kind)
    assert code == 500 and b"never" not in body
    assert any(r.name == "inproc_bridge" and r.exc_info for r in caplog.records)
    assert probe.wait_finished()


@pytest.mark.parametrize("sent", ["nothing", "write", "yield"])
@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_badinput_start_response_with_exc_info_replaces_the_head_until_it_went_out(
        app_kind, sent, caplog):
    # PEP 3333: start_response(..., exc_info) may replace a head not sent
    # yet; once data went out -- given to write() or yielded -- it re-raises
    # the app's exception: the caller's read raises, or (data written in the
    # caller's thread waits for the app call, which failed) the logged 500 --
    # never the app's error head over the 200's body.
    seen = []

    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        if sent == "write":
            write(FIRST)
        elif sent == "yield":
            yield FIRST
        try:
            raise AppFault("the app's error page")
        except AppFault:
            try:
                start_response("503 Later", [("Content-Type", "text/plain")], sys.exc_info())
            except AppFault:
                seen.append("re-raised")
                raise
        yield b"error page"

    opener = _opener({"api": app})
    with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"):
        if sent == "nothing":
            with _http_error(503) as info:
                opener.open("inproc://api/", timeout=_timeout_for(app_kind))
            assert info.value.d_body == b"error page" and seen == []
            return
        if sent == "write" and app_kind == "wsgi-inline":
            assert _expect_500(opener, app_kind) == (500, _ERROR_BODY)
        else:
            with opener.open("inproc://api/", timeout=_timeout_for(app_kind)) as resp:
                assert resp.status == 200
                with pytest.raises(ALLOWED):
                    resp.read()
    assert seen == ["re-raised"]


@pytest.mark.parametrize("where", ["header", "reason"])
@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_badinput_response_text_beyond_latin_1_is_500(app_kind, where, caplog):
    # No wire carries it (PEP 3333: ISO-8859-1 or RFC 2047): a handler
    # class's send_header() raises, wsgiref sends a broken head.  In-process
    # every kind is a logged 500, never a head no server could have sent.
    text = "r\u00e9sum\u00e9 \u201cv2\u201d"
    logic = _answer(
        "200 OK" if where == "header" else "200 " + text,
        [("Content-Type", "text/plain"), *([("X-File", text)] if where == "header" else [])],
        b"ok")
    opener = _opener({"api": make_app(app_kind, logic)})
    with caplog.at_level(logging.CRITICAL, logger="inproc_bridge"):
        code, body = _expect_500(opener, app_kind)
    assert code == 500 and body == _ERROR_BODY


@pytest.mark.parametrize("result", [42, None, "text", object()],
                         ids=["int", "None", "str", "object"])
@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_badinput_wsgi_non_iterable_result_is_500(app_kind, result, caplog):
    # An invalid app on purpose: not wrapped in validator, which would stop it first.
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return result

    opener = _opener({"api": app})
    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        code, _ = _expect_500(opener, app_kind)
    assert code == 500
    assert any(r.name == "inproc_bridge" for r in caplog.records)


def _str_yielding_wsgi(closed, items):
    """An invalid WSGI app on purpose (not wrapped in validator): it yields
    ``items``, a str among them, and sets ``closed`` when its result closes."""

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            yield from items
        finally:
            closed.set()

    return app


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_badinput_wsgi_yields_str_first_is_500(app_kind):
    closed = threading.Event()
    opener = _opener({"api": _str_yielding_wsgi(closed, ["text"])})
    code, _ = _expect_500(opener, app_kind)
    assert code == 500
    assert closed.wait(WAIT)


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_badinput_wsgi_yields_str_after_first_chunk_raises_on_read(app_kind):
    closed = threading.Event()
    opener = _opener({"api": _str_yielding_wsgi(closed, [b"good|", "text", b"never"])})

    def run():
        got = b""
        with opener.open("inproc://api/", timeout=_timeout_for(app_kind)) as resp:
            assert resp.status == 200
            with pytest.raises(ALLOWED):
                while True:
                    data = resp.read(3)
                    if not data:
                        break
                    got += data
        return got

    got = _call(run)
    assert b"good|".startswith(got), got
    assert closed.wait(WAIT)


def test_badinput_request_body_iterator_failure_reaches_caller(app_kind, kind_timeout, worker_pool):
    """The caller's own error from its body iterator reaches it; the app is
    released (ASGI: told the caller left)."""
    probe = Probe()

    def upload():
        yield b"x" * 1000
        yield b"y" * PIECE
        raise BodyFault("the body broke")

    def run():
        req = urllib.request.Request("inproc://api/", data=upload(), method="POST")
        opener.open(req, timeout=kind_timeout).close()

    with Bridge({"api": make_app(app_kind, _answer(body=b"ok"), probe)}) as (opener, _):
        with pytest.raises(BodyFault, match="the body broke"):
            _call(run)
        _assert_no_app_left(probe)
    if app_kind == "asgi":
        assert probe.details("disconnect") == [True]
    _assert_threads_back(worker_pool)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt],
                         ids=["SystemExit", "KeyboardInterrupt"])
@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_badinput_app_base_exception_is_contained(app_kind, exc_type, when, caplog, worker_pool):
    probe = Probe()

    def fail():
        raise exc_type("raised by the app")

    def logic(req):
        if when == "before":
            fail()

        def body():
            yield FIRST
            fail()

        return 200, [("Content-Type", "text/plain")], body()

    opener = _opener({"api": make_app(app_kind, logic, probe)})


    def run():
        try:
            try:
                resp = opener.open("inproc://api/", timeout=_timeout_for(app_kind))
            except urllib.error.HTTPError as err:
                with err:
                    return "status", err.code
            with resp:
                assert resp.read(len(FIRST)) == FIRST
                try:
                    resp.read()
                except ALLOWED as exc:
                    return "read-error", type(exc)
                return "clean", None
        except (SystemExit, KeyboardInterrupt) as exc:
            return "escaped", type(exc)

    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        outcome = _call(run)
    if when == "before":
        assert outcome == ("status", 500)
    else:
        assert outcome[0] == "read-error", outcome
    assert probe.wait_finished()
    logged = [r for r in caplog.records if r.name == "inproc_bridge" and r.exc_info]
    assert any(r.exc_info[0] is exc_type for r in logged), caplog.records
    _assert_threads_back(worker_pool)


@pytest.mark.parametrize("failure, raised", [
    ("len-raises", RuntimeError),
    ("len-negative", ValueError),
    ("len-huge", OverflowError),
    ("iter-raises", RuntimeError),
    ("first-next-raises", RuntimeError),
    ("first-item-str", TypeError),
])
@pytest.mark.parametrize("app_kind", ["wsgi-inline", "wsgi-worker"])
def test_wsgi_result_failing_before_the_head_is_a_logged_500(app_kind, failure, raised, caplog):
    closes, closed = [], threading.Event()
    opener = _opener({"app": _result_app(failure, closes, closed)})

    def errors():
        return [r for r in caplog.records
                if r.name == "inproc_bridge" and r.levelno >= logging.ERROR]

    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open("inproc://app/", timeout=KIND_TIMEOUT[app_kind]).close()
        with info.value as err:
            status, body = err.code, err.read()
        assert closed.wait(WAIT)
        assert _wait_for(errors)  # a worker may log just after the caller has its 500
    assert (status, body) == (500, _ERROR_BODY)
    (record,) = errors()
    assert record.exc_info is not None and record.exc_info[0] is raised
    assert record.exc_info[2] is not None  # the traceback
    assert len(closes) == 1


@pytest.mark.parametrize("failure", ["len-float", "len-str"])
@pytest.mark.parametrize("app_kind", ["wsgi-inline", "wsgi-worker"])
def test_wsgi_result_len_not_an_int_means_no_length(app_kind, failure, caplog):
    closes, closed = [], threading.Event()
    opener = _opener({"app": _result_app(failure, closes, closed)})
    with caplog.at_level(logging.WARNING, logger="inproc_bridge"):
        with opener.open("inproc://app/", timeout=KIND_TIMEOUT[app_kind]) as resp:
            status, length, body = resp.status, resp.getheader("Content-Length"), resp.read()
        assert closed.wait(WAIT)
    assert (status, length, body) == (200, None, b"onetwo")
    assert not [r for r in caplog.records if r.name == "inproc_bridge"]
    assert len(closes) == 1


@pytest.mark.parametrize("failure", ["len-raises", "len-float"])
@pytest.mark.parametrize("app_kind", ["wsgi-inline", "wsgi-worker"])
def test_wsgi_result_len_failure_answers_as_wsgiref(app_kind, failure):
    def fetch(opener, url, timeout):
        with _open_any(opener, url, timeout) as resp:
            return resp.status, resp.reason, resp.headers.get("Content-Type"), resp.read()

    real_closes, real_closed = [], threading.Event()
    with _loopback(_result_app(failure, real_closes, real_closed)) as base:
        real = fetch(_net_opener(), base + "/", WAIT)
        assert real_closed.wait(WAIT)

    closes, closed = [], threading.Event()
    opener = _opener({"app": _result_app(failure, closes, closed)})
    ours = fetch(opener, "inproc://app/", KIND_TIMEOUT[app_kind])
    assert closed.wait(WAIT)
    assert ours == real
    assert real[0] == (500 if failure == "len-raises" else 200)
    assert (len(closes), len(real_closes)) == (1, 1)


@pytest.mark.parametrize("failure, answer", [
    pytest.param("none", (200, b"onetwo"), id="after-the-body"),
    pytest.param("first-next-raises", (500, _ERROR_BODY), id="before-the-head"),
])
@pytest.mark.parametrize("app_kind", ["wsgi-inline", "wsgi-worker"])
def test_wsgi_result_close_attribute_failing_is_logged_not_raised(app_kind, failure, answer,
                                                                  caplog):
    closes, closed = [], threading.Event()
    opener = _opener({"app": _result_app(failure, closes, closed, _BadCloseResult)})

    def close_errors():
        return [r for r in caplog.records if r.name == "inproc_bridge"
                and r.levelno >= logging.ERROR and r.exc_info
                and str(r.exc_info[1]) == "the close attribute failed"]

    with caplog.at_level(logging.ERROR, logger="inproc_bridge"):
        with _open_any(opener, "inproc://app/", KIND_TIMEOUT[app_kind]) as resp:
            got = resp.status, resp.read()
        assert closed.wait(WAIT)
        assert _wait_for(close_errors)
    assert got == answer
    assert len(closes) == 1


# ---------------------------------------------------------------------------
# Timeouts and cancellation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("app_kind", ["handler", "wsgi-worker", "asgi"])
def test_timeout_before_headers_raises_socket_timeout(app_kind):
    """A caller that times out before the head gets socket.timeout (not a
    URLError, as urllib raises it over TCP), promptly.  The app then finds
    ib.cancelled() set; a handler's or ASGI app's next write fails with
    BrokenPipeError; an ASGI app's receive() says the caller left."""
    release, done, record, probe = threading.Event(), threading.Event(), {}, Probe()

    def logic(req):
        release.wait(WAIT)
        record["cancelled"] = ib.cancelled().is_set()
        done.set()
        return 200, [("Content-Type", "text/plain"), ("Content-Length", "4")], [b"late"]

    async def slow(scope, receive, send):
        assert scope["type"] == "http"
        record["first"] = await receive()
        record["second"] = await receive()  # waits until the caller gives up
        record["cancelled"] = ib.cancelled().is_set()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        except OSError as exc:
            record["send_error"] = exc
        done.set()

    app = slow if app_kind == "asgi" else make_app(app_kind, logic, probe)
    with Bridge({"api": app}) as (opener, _):
        started = time.monotonic()
        with pytest.raises(socket.timeout) as info:
            opener.open("inproc://api/", timeout=0.2)
        assert not isinstance(info.value, urllib.error.URLError)
        assert time.monotonic() - started < 5
        release.set()
        assert done.wait(WAIT) and (app_kind == "asgi" or probe.wait_finished())
    assert record["cancelled"] is True
    if app_kind == "handler":
        assert probe.details("write-error") == [BrokenPipeError]
    elif app_kind == "asgi":
        assert isinstance(record["send_error"], BrokenPipeError)
    if app_kind == "asgi":
        assert record["first"]["type"] == "http.request"
        assert record["second"] == {"type": "http.disconnect"}


@pytest.mark.parametrize("app_kind", ["handler", "wsgi-worker", "asgi"])
def test_timeout_between_chunks_raises_from_read(app_kind):
    release = threading.Event()

    def logic(req):
        def chunks():
            yield b"first\n"
            release.wait(WAIT)

        return 200, [("Content-Type", "text/plain")], chunks()

    with serve_kind(app_kind, logic, "api") as (opener, _):
        try:
            with opener.open("inproc://api/", timeout=0.2) as resp:
                assert resp.readline() == b"first\n"
                with pytest.raises(socket.timeout):
                    resp.readline()
        finally:
            release.set()


def test_caller_close_sets_cancelled_and_next_write_fails(app_kind, kind_timeout):
    """A caller that reads some of an endless stream and closes it: the app
    finds ib.cancelled() set -- a handler when its next write fails, a WSGI
    app when its result is closed, an ASGI app when its receive() says the
    caller left -- and the worker that ran it goes back to the pool."""
    line = b"x" * 1000 + b"\n"
    seen, done, probe = [], threading.Event(), Probe()

    def logic(req):
        event = ib.cancelled()

        def endless():
            try:
                while True:
                    yield line
            finally:
                seen.extend((event.is_set(), threading.get_ident()))
                done.set()

        return 200, [("Content-Type", "text/plain")], endless()

    async def endless(scope, receive, send):
        assert scope["type"] == "http"
        left = asyncio.Event()

        async def listen():
            while (await receive())["type"] != "http.disconnect":
                pass
            seen.append(ib.cancelled().is_set())
            left.set()

        listener = asyncio.ensure_future(listen())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while not left.is_set():
                await send({"type": "http.response.body", "body": line, "more_body": True})
        except OSError:
            pass
        await listener  # the app learns the client left, the ASGI way
        done.set()

    app = endless if app_kind == "asgi" else make_app(app_kind, logic, probe)
    with Bridge({"api": app}) as (opener, _):
        resp = opener.open("inproc://api/", timeout=kind_timeout)
        for _ in range(10):
            assert resp.readline() == line
        resp.close()
        assert done.wait(WAIT)
    assert seen[0] is True
    if app_kind == "handler":  # its next write failed
        assert probe.wait_finished() and probe.details("write-error") == [BrokenPipeError]
    if app_kind in ("handler", "wsgi-worker"):
        # The worker that ran it goes back to the pool, free for the next request.
        assert _wait_for(lambda: seen[1] in ib._workers.idle()), (
            "the worker did not return to the pool")


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_caller_close_makes_wsgi_write_raise(kind_timeout):
    errors, done = [], threading.Event()

    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            try:
                yield b"first"
                while True:
                    yield b""  # keeps the worker path asking
            finally:
                try:
                    write(b"after the caller left")
                except BrokenPipeError as exc:
                    errors.append(exc)
                done.set()

        return body()

    resp = _opener({"api": app}).open("inproc://api/", timeout=kind_timeout)
    assert resp.read(5) == b"first"
    resp.close()
    assert done.wait(WAIT)
    assert len(errors) == 1


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


def test_asgi_timeout_between_chunks():
    baton, record, done = Baton(), {}, threading.Event()

    async def stalls(scope, receive, send):
        assert scope["type"] == "http"
        await _send(send, b"first\n", more=True)
        await baton.take()
        record["after"] = await receive()
        done.set()

    with Bridge({"api": stalls}) as (opener, _):
        with opener.open("inproc://api/", timeout=0.2) as resp:
            assert resp.readline() == b"first\n"
            with pytest.raises(socket.timeout):
                resp.read(10)
        baton.give()
        assert done.wait(WAIT)
    assert record["after"] == {"type": "http.disconnect"}


def test_asgi_disconnect_once_the_response_is_complete():
    record, done = {}, threading.Event()

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        await receive()
        await _send(send, b"done")
        record["after"] = await receive()  # returns at once, as uvicorn's does
        done.set()

    with Bridge({"api": app}) as (opener, _), opener.open("inproc://api/", timeout=WAIT) as resp:
        assert done.wait(WAIT)
        assert resp.read() == b"done"
    assert record["after"] == {"type": "http.disconnect"}


@pytest.mark.parametrize("method, status", [("HEAD", 200), ("GET", 204), ("GET", 304),
                                            ("GET", 103)], ids=["HEAD", "204", "304", "1xx"])
def test_asgi_send_raises_after_caller_left_though_no_body_is_sent(method, status):
    # An SSE app answering HEAD (or 204, 304, 1xx) used to stream every event into the
    # void: the body is dropped, and so was the news that the caller left.
    baton, streaming, done = Baton(), threading.Event(), threading.Event()
    record = {"before": 0, "after": 0}

    async def sse(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        try:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for i in range(3):  # while the caller is there: no error
                await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                            "more_body": True})
                record["before"] += 1
            streaming.set()
            await baton.take()  # the caller has closed
            while record["after"] < 10000:
                await send({"type": "http.response.body", "body": b"data: more\n\n",
                            "more_body": True})
                record["after"] += 1
        except BaseException as exc:
            record["error"] = exc
        finally:
            done.set()

    with Bridge({"api": sse}) as (opener, _):
        req = urllib.request.Request("inproc://api/events", method=method)
        try:
            resp = opener.open(req, timeout=WAIT)
        except urllib.error.HTTPError as exc:  # 304 and 1xx
            resp = exc
        with resp:
            assert resp.getcode() == status
            assert streaming.wait(WAIT)  # the first sends came while the caller was there
        baton.give()
        assert done.wait(WAIT), "the app did not finish"
    assert record["before"] == 3
    assert "error" in record, "the app sent %d chunks and was never told" % record["after"]
    assert isinstance(record["error"], OSError), repr(record["error"])
    assert record["after"] == 0, "sends went on after the caller left"


def test_asgi_dropped_body_sends_yield_to_other_requests():
    spinner, spin = _dropped_body_spinner(3 * WAIT)

    async def other(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        await _send(send, b"other")

    with Bridge({"spin": spinner, "other": other}) as (opener, bridge):
        try:
            resp = opener.open(urllib.request.Request("inproc://spin/", method="HEAD"),
                               timeout=WAIT)
            try:
                assert spin.looping.wait(WAIT)
                # The same bridge, the same loop: served while the spinner spins.
                with opener.open("inproc://other/", timeout=WAIT) as resp2:
                    assert resp2.read() == b"other"
                assert not spin.done.is_set()
            finally:
                resp.close()
            assert spin.done.wait(WAIT), "the spinner did not stop when its caller left"
            assert isinstance(spin.ended, OSError), spin.ended
            started = time.monotonic()
            bridge.close()
            assert time.monotonic() - started < WAIT
        finally:
            spin.stop.set()  # before Bridge closes the handler


def test_asgi_close_cancels_an_app_spinning_on_dropped_body_sends():
    # The app gives up by itself after WAIT, as the unfixed module needs.
    spinner, spin = _dropped_body_spinner(WAIT)
    try:
        with Bridge({"spin": spinner}) as (opener, bridge):
            with opener.open(urllib.request.Request("inproc://spin/", method="HEAD"), timeout=WAIT):
                assert spin.looping.wait(WAIT)
                started = time.monotonic()
                bridge.close()
                elapsed = time.monotonic() - started
                assert spin.done.is_set()
            assert elapsed < WAIT / 2, "close() waited %.1f s for a spinning app" % elapsed
            assert isinstance(spin.ended, (asyncio.CancelledError, OSError)), spin.ended
    finally:
        spin.stop.set()


@pytest.mark.parametrize("how", ["close", "timeout"])
def test_asgi_every_task_waiting_in_receive_gets_disconnect(how):
    done, record = threading.Event(), {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        while (await receive()).get("more_body"):
            pass
        got = {}

        async def listen(n):
            got[n] = await receive()

        tasks = [asyncio.ensure_future(listen(n)) for n in range(2)]
        await asyncio.sleep(0)  # a yield, not a wait: both tasks now sit in receive()
        try:
            if how == "close":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
            _, pending = await asyncio.wait(tasks, timeout=WAIT)
            for task in pending:
                task.cancel()
            record["got"] = [got.get(n) for n in range(2)]
        finally:
            done.set()

    with Bridge({"api": app}) as (opener, _):
        if how == "close":
            with opener.open("inproc://api/", data=b"body", timeout=WAIT) as resp:
                assert resp.readline() == b"first\n"
        else:
            with pytest.raises(socket.timeout):
                opener.open("inproc://api/", data=b"body", timeout=0.3)
        assert done.wait(2 * WAIT)
    assert record["got"] == [{"type": "http.disconnect"}] * 2


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_asgi_after_a_timeout_before_the_head_send_raises_and_receive_disconnects(method):
    baton, done, record = Baton(), threading.Event(), {}

    async def slow(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        await receive()
        pending = asyncio.ensure_future(receive())
        try:
            await baton.take()  # the caller has timed out
            try:
                await _send(send, b"late")
            except BaseException as exc:
                record["send_error"] = exc
            record["receive"] = await asyncio.wait_for(pending, WAIT)
        finally:
            done.set()

    with Bridge({"api": slow}) as (opener, _):
        with pytest.raises(socket.timeout):
            opener.open(urllib.request.Request("inproc://api/", method=method), timeout=0.3)
        baton.give()
        assert done.wait(2 * WAIT)
    assert isinstance(record.get("send_error"), OSError), record
    assert record["receive"] == {"type": "http.disconnect"}


# ---------------------------------------------------------------------------
# Requests and request bodies
# ---------------------------------------------------------------------------
# What the app sees of the request, and the caller's body.


@pytest.mark.parametrize("size", [10, 70000, 3 << 20])
@pytest.mark.parametrize("shape", ["bytes", "file", "iterable"])
def test_handler_request_bodies_small_and_streamed(size, shape):
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    echo = make_app("handler", lambda req: (
        200, [("Content-Length", "%d" % len(b"%d:1" % size))],
        [b"%d:%d" % (len(req.body), req.body == payload)]))
    if shape == "bytes":
        data = payload
    elif shape == "file":
        data = io.BytesIO(payload)
    else:
        data = (payload[i:i + 50000] for i in range(0, len(payload), 50000))
    with _opener({"api": echo}).open("inproc://api/", data=data, timeout=10) as resp:
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
    server, seen = object(), {}

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
                server=self.server, client=self.client_address,
                same_socket=self.request is self.connection, command=self.command,
                path=self.path, version=self.request_version, host=self.headers["Host"],
                agent=self.headers["User-Agent"],
                body=self.rfile.read(int(self.headers["Content-Length"])))
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


@pytest.mark.parametrize("data", [None, b"a=1", iter([b"chunk"])])
def test_handler_request_bytes_match_a_real_socket(data):
    # The request a handler reads, byte for byte, is what urllib sends over TCP
    # (bar the Host value, which names the server).
    seen = []

    class Record(QuietHandler):
        def do_POST(self):
            self.do_GET()

        def do_GET(self):
            if self.headers["Transfer-Encoding"] == "chunked":
                while self.rfile.readline() not in (b"0\r\n", b""):
                    self.rfile.readline()
                self.rfile.readline()
            elif self.headers["Content-Length"]:
                self.rfile.read(int(self.headers["Content-Length"]))
            # read the body first: over TCP a close with unread bytes resets
            seen.append((self.raw_requestline, self.headers.items()))
            _respond(self, body=b"ok")

    def fetch(opener, url):
        body = data if not isinstance(data, type(iter([]))) else iter([b"chunk"])
        req = urllib.request.Request(url, data=body, headers={"X-Int": 7, "X-Tab": "a\tb"})
        with opener.open(req, timeout=WAIT) as resp:
            assert resp.read() == b"ok"

    with _loopback(Record) as base:
        fetch(_net_opener(), base + "/p?q=1")
    fetch(_opener({"api": Record}), "inproc://api/p?q=1")
    (net_line, net_headers), (here_line, here_headers) = seen
    assert here_line == net_line
    normalize = lambda items: [(k, "HOST" if k == "Host" else v) for k, v in items]  # noqa: E731
    assert normalize(here_headers) == normalize(net_headers)


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
        seen["body"] = _read_input(environ)
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


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_wsgi_chunked_request_body_reads_to_eof(kind_timeout):
    seen = {}

    def app(environ, start_response):
        seen["length"] = environ.get("CONTENT_LENGTH")
        seen["body"] = _read_input(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % len(seen["body"])]

    chunks = [b"a" * 1000, b"b" * 10, b"", b"c" * 5000]
    opener = _opener({"api": validator(app)})
    with opener.open("inproc://api/", data=iter(chunks), timeout=kind_timeout) as resp:
        assert resp.read() == b"6010"
    assert seen["length"] is None and seen["body"] == b"".join(chunks)


def test_request_carries_host_user_agent_and_data_defaults(app_kind, kind_timeout):
    seen = []
    opener = _inproc_opener({"api": make_app(app_kind, _host_seer(seen))})
    opener.addheaders = [("User-agent", "d-bot/2")]
    for url, data in (("inproc://api/x", None), ("inproc://API/y", b"k=v")):
        with opener.open(url, data=data, timeout=kind_timeout) as resp:
            assert resp.status == 204 and resp.read() == b""
    assert seen == [("api", "d-bot/2", None, None),
                    ("API", "d-bot/2", "application/x-www-form-urlencoded", "3")]


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_request_iterable_body_reaches_wsgi_app_without_length(kind_timeout):
    calls = []
    opener = _inproc_opener({"api": _environ_app(calls)})
    for data in (_chunks(), io.BytesIO(b"alpha,beta,gamma"), [b"alpha,", b"beta,gamma"]):
        with opener.open("inproc://api/up", data=data, timeout=kind_timeout) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["body"] == "alpha,beta,gamma"
        assert calls[-1]["CONTENT_LENGTH"] is None
    with opener.open("inproc://api/up", data=b"alpha", timeout=kind_timeout) as resp:
        resp.read()
    assert calls[-1]["CONTENT_LENGTH"] == "5"


def test_asgi_request_body_streams_in_several_messages():
    got_first, messages = threading.Event(), []

    async def echo(scope, receive, send):
        assert scope["type"] == "http"
        while True:
            message = await receive()
            messages.append(message)
            got_first.set()
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body",
                    "body": b"".join(m.get("body", b"") for m in messages)})

    def body():
        yield b"first,"
        # The app has received the first chunk before the second exists.
        assert got_first.wait(WAIT)
        yield b"second,"
        yield b"third"

    with Bridge({"api": echo}) as (opener, _):
        with opener.open("inproc://api/upload", data=body(), timeout=WAIT) as resp:
            assert resp.read() == b"first,second,third"
        assert len(messages) >= 2
        assert all(m["type"] == "http.request" for m in messages)
        assert all(m["more_body"] for m in messages[:-1]) and not messages[-1]["more_body"]
        assert messages[0]["body"] == b"first,"

        messages.clear()
        with opener.open("inproc://api/file", data=io.BytesIO(b"y" * 200000), timeout=WAIT) as resp:
            assert resp.read() == b"y" * 200000


def test_asgi_request_body_send_timeout_is_urlerror():
    # As urllib reports a request it could not send in time: URLError(timeout).
    release = threading.Event()

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        while not release.is_set():  # never reads the body
            await asyncio.sleep(0.01)

    big = (b"z" * 65536 for _ in range(64))  # 4 MiB: more than the pipe holds
    with Bridge({"api": app}) as (opener, _):
        try:
            with pytest.raises(urllib.error.URLError) as info:
                opener.open("inproc://api/", data=big, timeout=0.2)
            assert isinstance(info.value.reason, socket.timeout)
        finally:
            release.set()


@pytest.mark.parametrize("app_kind", ["handler", "wsgi-worker", "asgi"])
def test_request_body_generator_is_not_pulled_after_open_raised(app_kind):
    clock, pulls = itertools.count(), []
    release, done = threading.Event(), threading.Event()
    seen = {}

    def endless():
        chunk = b"x" * 16384
        while True:
            pulls.append((threading.get_ident(), next(clock)))
            yield chunk

    def serve(path, read):
        # Reads a little, then stalls until released (so open() times out),
        # then reads on -- at most 4 MiB -- to see what it gets.
        got, ending = [], "cap"
        try:
            got.append(read(8192))
            release.wait(WAIT)
            for _ in range(512):
                data = read(8192)
                if not data:
                    ending = "eof"
                    break
                got.append(data)
        except Exception as exc:
            ending = exc
        finally:
            seen["ending"], seen["raw"] = ending, b"".join(got)
            done.set()
        return b"late"

    bridge = ib.InProcHandler({"app": _body_app(app_kind, serve)})
    try:
        opener = urllib.request.build_opener(bridge)
        with pytest.raises((socket.timeout, urllib.error.URLError)) as info:
            opener.open("inproc://app/upload", data=endless(), timeout=0.3).close()
        left_at = next(clock)
        release.set()
        assert done.wait(WAIT)
    finally:
        release.set()
        bridge.close()
    assert _timed_out(info.value), repr(info.value)
    late = [n for _, n in pulls if n > left_at]
    assert not late, "the body was pulled %d more times after open() raised" % len(late)
    assert {ident for ident, _ in pulls} == {threading.get_ident()}
    ending = seen["ending"]
    if app_kind == "handler":
        # A raw rfile: the bytes sent before open() left, then its end -- never
        # a chunked body that looks complete.
        assert ending == "eof" or isinstance(ending, OSError), repr(ending)
        assert not seen["raw"].endswith(b"0\r\n\r\n")
    else:
        assert isinstance(ending, OSError), repr(ending)


@pytest.mark.parametrize("app_kind", ["handler", "wsgi-worker", "asgi"])
def test_request_body_retry_on_the_same_file_gets_the_whole_file(app_kind):
    body = b"".join(hashlib.sha256(b"%d" % n).digest() for n in range(32768))  # 1 MiB
    readers = []
    upload = _RecordedFile(body, readers)
    release_first, first_done = threading.Event(), threading.Event()
    first = {}

    def serve(path, read):
        if path == "/first":
            # Reads once, stalls until the retry is half way, then reads on.
            parts, ending = [], "complete"
            try:
                parts.append(read(8192))
                release_first.wait(WAIT)
                got = len(parts[0])
                while got < len(body):
                    data = read(min(65536, len(body) - got))
                    if not data:
                        ending = "eof"
                        break
                    parts.append(data)
                    got += len(data)
            except Exception as exc:
                ending = exc
            finally:
                first["data"], first["ending"] = b"".join(parts), ending
                first_done.set()
            return b"first"
        parts, got = [], 0
        while got < len(body):
            if got >= len(body) // 2 and not release_first.is_set():
                # Half way: the first attempt's app reads again now.
                release_first.set()
                first_done.wait(WAIT)
            data = read(min(65536, len(body) - got))
            if not data:
                break
            parts.append(data)
            got += len(data)
        whole = b"".join(parts)
        return b"%d %s" % (len(whole), hashlib.sha256(whole).hexdigest().encode())

    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
    bridge = ib.InProcHandler({"app": _body_app(app_kind, serve)})
    try:
        opener = urllib.request.build_opener(bridge)
        with pytest.raises((socket.timeout, urllib.error.URLError)) as info:
            opener.open(urllib.request.Request("inproc://app/first", data=upload,
                                               headers=headers), timeout=0.3).close()
        upload.seek(0)
        with opener.open(urllib.request.Request("inproc://app/second", data=upload,
                                                headers=headers),
                         timeout=KIND_TIMEOUT[app_kind]) as resp:
            answer = resp.read()
        assert first_done.wait(WAIT)
    finally:
        release_first.set()
        bridge.close()
    assert _timed_out(info.value), repr(info.value)
    assert answer == b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
    got, ending = first["data"], first["ending"]
    assert got == body[:len(got)], "the first app read bytes that were not its own, in order"
    assert isinstance(ending, OSError) or (ending == "complete" and got == body), (
        "the first app's body ended with %r after %d of %d bytes" % (ending, len(got), len(body)))
    assert set(readers) == {threading.get_ident()}


def test_request_body_left_unread_is_not_pulled_after_open_returned(app_kind):
    clock, pulls = itertools.count(), []

    def large():  # 8 MiB, each chunk a fresh object, so buffering them all shows
        for n in range(128):
            pulls.append((threading.get_ident(), next(clock)))
            yield bytes([n]) * 65536

    bridge = ib.InProcHandler({"app": _body_app(app_kind,
                                                lambda path, read: b"answered without reading")})
    opener = urllib.request.build_opener(bridge)

    def call():
        with opener.open("inproc://app/", data=large(), timeout=KIND_TIMEOUT[app_kind]) as resp:
            returned_at = next(clock)
            answer = resp.status, resp.read()
        return threading.get_ident(), returned_at, answer

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        caller, returned_at, answer = _call(call, WAIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()
        bridge.close()
    assert answer == (200, b"answered without reading")
    assert not [n for _, n in pulls if n > returned_at], "the body was pulled after open() returned"
    assert {ident for ident, _ in pulls} <= {caller}
    if not tracing:
        assert peak - baseline < 4 << 20, "%d bytes held for an 8 MiB body" % (peak - baseline)


# ---------------------------------------------------------------------------
# Concurrency, context, nesting
# ---------------------------------------------------------------------------


def test_parallel_requests_echo_their_own_payload(app_kind):
    def logic(req):
        return 200, [("Content-Type", "text/plain")], [
            req.body[i:i + 100] for i in range(0, len(req.body), 100)]

    results, errors = {}, []
    with serve_kind(app_kind, logic, "api") as (opener, timeout):

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


def test_context_vars_reach_the_app_and_do_not_leak_back(app_kind):
    var = contextvars.ContextVar("var", default="unset")
    seen = []

    def logic(req):
        seen.append((var.get(), ib.current_source(), ib.current_actor(), ib.cancelled().is_set()))
        var.set("changed by app")
        return 200, [("Content-Type", "text/plain")], []

    with ib.OpenerFactory({"api": make_app(app_kind, logic)}) as factory:
        opener = factory.opener_for(actor={"id": 7}, source="billing")
        var.set("caller")
        with opener.open("inproc://api/", timeout=KIND_TIMEOUT[app_kind]) as resp:
            resp.read()
    assert seen == [("caller", "billing", {"id": 7}, False)]
    assert isinstance(seen[0][1], ib.Source)
    assert var.get() == "caller"  # the app ran in a copy
    assert ib.current_source() is None


def test_context_each_request_gets_its_callers_context_on_a_reused_thread(app_kind):
    # The first request starts the worker (or the ASGI loop's thread); where
    # threads inherit their starter's context (3.14's thread_inherit_context,
    # on by default on free-threaded builds) that thread must not hand the
    # first caller's context to the next request it serves.
    var = contextvars.ContextVar("var", default="unset")
    seen = []

    def logic(req):
        seen.append((req.target, var.get(), threading.get_ident()))
        return 200, [("Content-Type", "text/plain")], []

    with serve_kind(app_kind, logic) as (opener, timeout):
        def call(path, value):
            if value is not None:
                var.set(value)
            with opener.open("inproc://app" + path, timeout=timeout) as resp:
                resp.read()

        contextvars.copy_context().run(call, "/first", "first caller")
        contextvars.copy_context().run(call, "/second", None)
        contextvars.copy_context().run(call, "/third", "third caller")
    assert [(path, value) for path, value, _ in seen] == [
        ("/first", "first caller"), ("/second", "unset"), ("/third", "third caller")]
    if app_kind == "asgi":
        # One loop thread serves them all: the case the inheritance would bite.
        assert len({ident for _, _, ident in seen}) == 1


# Not ASGI: make_app() pulls an ASGI body on the loop's default executor,
# which has fewer threads than six nested calls hold (see
# test_asgi_no_timeout_and_nested_calls for ASGI).
@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_nested_calls_from_inside_an_app(app_kind, kind_timeout):
    """An app that calls the bridge it runs under, six deep: each level gets
    the one below's answer; the innermost sees the outer source."""
    handler = ib.InProcHandler(source="outer")
    opener = urllib.request.build_opener(handler)

    def inner_body(depth):
        if depth == 0:
            return b"bottom:%s" % str(ib.current_source()).encode()
        with opener.open("inproc://api/%d" % (depth - 1), timeout=kind_timeout) as resp:
            return b"%d>" % depth + resp.read()

    def logic(req):
        def body():  # the nested call runs as the body is made
            yield inner_body(int(req.target[1:]))

        return 200, [("Content-Type", "text/plain")], body()

    handler.mount("api", make_app(app_kind, logic))
    try:
        with opener.open("inproc://api/6", timeout=kind_timeout) as resp:
            assert resp.read() == b"6>5>4>3>2>1>bottom:outer"
    finally:
        handler.close()


def test_asgi_concurrent_requests_share_the_loop():
    n = 12
    threads_seen, arrived, all_in = set(), [], {}

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        await _receive_messages(receive)
        threads_seen.add(threading.current_thread().name)
        if "event" not in all_in:
            all_in["event"] = asyncio.Event()
        arrived.append(scope["path"])
        if len(arrived) == n:
            all_in["event"].set()
        # Every request is in flight on the loop at once before any answers.
        await asyncio.wait_for(all_in["event"].wait(), WAIT)
        await _send(send, scope["path"].encode())

    slow_baton = Baton()

    async def slow_stream(scope, receive, send):
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(40):  # 2.5 MiB: the reader below never drains it
            await send({"type": "http.response.body", "body": b"s" * 65536, "more_body": True})
        await slow_baton.take()
        await send({"type": "http.response.body", "body": b""})

    results = {}
    with Bridge({"api": app, "slow": slow_stream}) as (opener, _):
        slow = opener.open("inproc://slow/", timeout=WAIT)  # and left unread: it blocks its app
        try:
            def fetch(i):
                with opener.open("inproc://api/%d" % i, timeout=WAIT) as resp:
                    results[i] = resp.read()

            workers = [threading.Thread(target=fetch, args=(i,)) for i in range(n)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(WAIT)
        finally:
            slow.close()
    assert results == {i: b"/%d" % i for i in range(n)}
    assert threads_seen == {"inproc_bridge-asgi"}


def test_asgi_no_timeout_and_nested_calls():
    async def inner(scope, receive, send):
        assert scope["type"] == "http"
        await _send(send, b"inner")

    record = {}

    async def outer(scope, receive, send):
        assert scope["type"] == "http"
        # A blocking call from the loop thread itself would deadlock: refused.
        try:
            opener.open("inproc://inner/")
        except ib.BridgeError as exc:
            record["refused"] = exc

        def call_inner():
            with opener.open("inproc://inner/") as resp:
                return resp.read()

        body = await asyncio.get_running_loop().run_in_executor(None, call_inner)
        await _send(send, b"outer+" + body)

    with Bridge({"inner": inner, "outer": outer}) as (opener, _):
        with opener.open("inproc://outer/") as resp:  # no timeout at all
            assert resp.read() == b"outer+inner"
    assert "deadlock" in str(record["refused"])


# ---------------------------------------------------------------------------
# fork()
# ---------------------------------------------------------------------------
# A bridge inherited by a child process.


@pytest.mark.parametrize("start", _FORK_STARTS)
def test_fork_child_serves_every_kind_with_and_without_timeout(app_kind, start):
    payload = bytes(range(256)) * 400  # 100 KiB: beyond what a handler request holds whole
    timeouts = [KIND_TIMEOUT[app_kind]] + ([None] if app_kind in ("handler", "asgi") else [])
    served_on = []
    with serve_kind(app_kind, _served_by(served_on)) as (opener, timeout):
        _warm_up(app_kind, opener, timeout, served_on)

        def child(report):
            for child_timeout in timeouts:
                with opener.open("inproc://app/child", data=payload, timeout=child_timeout) as resp:
                    report([child_timeout, resp.status, resp.read().decode()])

        reports, code, pid = _forked(start, child)
    expected = "pid %d got %d %s" % (pid, len(payload), hashlib.sha256(payload).hexdigest()[:16])
    assert reports == [[t, 200, expected] for t in timeouts]
    assert code == 0


@_needs_fork
def test_fork_parent_keeps_serving_with_its_threads(app_kind):
    served_on = []
    with serve_kind(app_kind, _served_by(served_on)) as (opener, timeout):
        server = _warm_up(app_kind, opener, timeout, served_on)

        def child(report):
            try:  # whether the child can serve is another test's business
                with opener.open("inproc://app/child", data=b"c", timeout=timeout) as resp:
                    resp.read()
            except Exception:
                pass
            for handler in opener.handlers:
                if isinstance(handler, ib.InProcHandler):
                    handler.close()  # what the child's exit would do; the parent's loop is its own
            report("done")

        reports, code, _ = _forked("os.fork", child)
        alive_after_fork = server.is_alive()
        with opener.open("inproc://app/after", data=b"parent", timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    assert alive_after_fork
    assert status == 200
    assert body == b"pid %d got 6 %s" % (
        os.getpid(), hashlib.sha256(b"parent").hexdigest()[:16].encode())
    if app_kind == "asgi":
        assert served_on[-1] is server  # the same loop thread serves on
    assert (reports, code) == (["done"], 0)


def _first_then_late(release, first=FIRST, late=b"late", wait=WAIT):
    """Logic that sends ``first`` at once and ``late`` only once ``release`` is set
    (or ``wait`` seconds have passed)."""
    def logic(req):
        def chunks():
            yield first
            release.wait(wait)
            yield late

        return 200, [("Content-Type", "text/plain")], chunks()

    return logic


@pytest.mark.parametrize("start", _FORK_STARTS)
def test_fork_child_read_of_a_parents_open_response_fails_promptly(app_kind, start):
    gate = threading.Event()
    logic = _first_then_late(gate, b"first\n", b"second\n", 3 * WAIT)
    # No timeout that could fire within the child's watchdog (WAIT seconds).
    timeout = 6 * WAIT if app_kind == "wsgi-worker" else None
    with serve_kind(app_kind, logic) as (opener, _):
        try:
            with opener.open("inproc://app/stream", timeout=timeout) as resp:
                assert resp.readline() == b"first\n"

                def child(report):
                    try:
                        data = resp.read()
                    except (OSError, http.client.HTTPException) as exc:
                        report(["raised", type(exc).__name__])
                    else:
                        report(["read", data.decode("latin-1")])

                reports, code, _ = _forked(start, child)
                gate.set()
                rest = resp.read()
        finally:
            gate.set()
    assert rest == b"second\n"  # the parent reads its response to the end
    assert len(reports) == 1 and reports[0][0] == "raised", (reports, code)
    assert reports[0][1] not in ("timeout", "TimeoutError")
    assert code == 0


@pytest.mark.parametrize("start", _FORK_STARTS)
def test_fork_child_drains_and_intercepts_without_the_parents_exchanges(app_kind, start):
    """A child forked while the parent streams: its drain() does not wait for
    the parent's exchange (it is not the child's to end), and intercept()
    works there -- no lock or block of the parent's stands in the way."""
    gate = threading.Event()
    logic = _first_then_late(gate, b"first\n", b"second\n", 3 * WAIT)
    timeout = 6 * WAIT if app_kind == "wsgi-worker" else None
    with Bridge({"app": make_app(app_kind, logic)}) as (opener, handler):
        try:
            with opener.open("inproc://app/stream", timeout=timeout) as resp:
                assert resp.readline() == b"first\n"

                def child(report):
                    started = time.monotonic()
                    cancelled = handler.drain(WAIT)
                    report(["drain", cancelled, time.monotonic() - started < WAIT / 2])
                    with ib.intercept({"api.internal": make_app("wsgi-inline", _answer(
                            body=b"in the child"))}, network=False):
                        conn = http.client.HTTPConnection("api.internal", timeout=WAIT)
                        conn.request("GET", "/")
                        report(["intercept", conn.getresponse().read().decode()])
                        conn.close()

                reports, code, _ = _forked(start, child)
                gate.set()
                rest = resp.read()
        finally:
            gate.set()
    assert rest == b"second\n"  # the parent's stream is untouched
    assert reports == [["drain", 0, True], ["intercept", "in the child"]], (reports, code)
    assert code == 0


@pytest.mark.parametrize("start", _FORK_STARTS)
def test_fork_child_serves_an_asgi_app_mounted_with_lifespan(start):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    scope["state"]["db"] = "connected"
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b"db=%s pid=%d" % (scope["state"].get("db", "none").encode(), os.getpid())
        await _send(send, body, 200, [(b"content-length", b"%d" % len(body))])

    with ib.InProcHandler({"app": app}) as bridge:
        opener = urllib.request.build_opener(bridge)
        with opener.open("inproc://app/", timeout=5) as resp:
            assert resp.read() == b"db=connected pid=%d" % os.getpid()

        def child(report):
            for child_timeout in (5.0, None):
                with opener.open("inproc://app/", timeout=child_timeout) as resp:
                    report([child_timeout, resp.status, resp.read().decode()])

        reports, code, pid = _forked(start, child)
    assert reports == [[t, 200, "db=connected pid=%d" % pid] for t in (5.0, None)]
    assert code == 0


# ---------------------------------------------------------------------------
# urllib parity: redirects, cookies, auth, interception, xmlrpc
# ---------------------------------------------------------------------------


def test_redirect_loop_message_matches_urllib(route_app):
    make_route, timeout = route_app
    opener = _inproc_opener({"api": make_route([])})
    with _http_error(302) as info:
        opener.open("inproc://api/loop", timeout=timeout)
    assert info.value.msg == urllib.request.HTTPRedirectHandler.inf_msg + "Found"
    assert info.value.geturl() == "inproc://api/loop"
    with _http_error(302) as info:
        opener.open("inproc://api/chain/0", timeout=timeout)
    assert "infinite loop" in info.value.msg


def test_request_urlopen_with_installed_opener(route_app):
    make_route, timeout = route_app
    saved = urllib.request._opener
    try:
        urllib.request.install_opener(_inproc_opener({"api": make_route([])}))
        with urllib.request.urlopen("inproc://api/echo?via=urlopen", timeout=timeout) as resp:
            seen = json.loads(resp.read())
        assert seen["query"] == "via=urlopen" and seen["method"] == "GET"
        with _http_error(418):
            urllib.request.urlopen("inproc://api/teapot", timeout=timeout)
    finally:
        urllib.request.install_opener(saved)
    assert urllib.request._opener is saved


@pytest.mark.parametrize("app_kind", [*SYNC_KINDS, pytest.param("asgi", marks=pytest.mark.xfail(
    sys.version_info < (3, 9), strict=True,
    reason="ASGI sends no reason phrase: the bridge takes http.HTTPStatus's, and "
           "Python 3.8 has none for 418"))])
def test_httperror_has_headers_and_readable_body(route_app):
    make_route, timeout = route_app
    opener = _inproc_opener({"api": make_route([])})
    with _http_error(418) as info:
        opener.open("inproc://api/teapot", timeout=timeout)
    err = info.value
    assert err.reason == "I'm a Teapot"
    assert err.headers["X-Why"] == "short and stout"
    assert err.d_body == b"no coffee"
    assert err.geturl() == "inproc://api/teapot"


def test_redirect_absolute_inproc_location(route_app):
    make_route, timeout = route_app
    calls, other_calls = [], []
    opener = _inproc_opener({"api": make_route(calls), "other": make_route(other_calls)})
    for to, final, who in (("inproc://api/echo", "inproc://api/echo", calls),
                           ("inproc://API/echo?z=1", "inproc://API/echo?z=1", calls),
                           ("inproc://other", "inproc://other/", other_calls),
                           ("//other/echo", "inproc://other/echo", other_calls)):
        url = "inproc://api/go?" + urllib.parse.urlencode({"code": 302, "to": to})
        with opener.open(url, data=b"dropped", timeout=timeout) as resp:
            assert resp.geturl() == final
            resp.read()
        assert who[-1][0] == "GET" and who[-1][3] == b""


def test_redirect_post_becomes_get_for_301_302_303(route_app):
    make_route, timeout = route_app
    calls = []
    opener = _inproc_opener({"api": make_route(calls)})
    for code in (301, 302, 303):
        url = "inproc://api/go?code=%d&to=/echo" % code
        req = urllib.request.Request(url, data=b"x=1", headers={"X-Extra": "kept"})
        with opener.open(req, timeout=timeout) as resp:
            seen = json.loads(resp.read())
        assert seen["method"] == "GET" and seen["body"] == ""
        assert seen["content-type"] is None and seen["x-extra"] == "kept"
    assert [c[0] for c in calls] == ["POST", "GET"] * 3


def test_redirect_307_post_raises_httperror(route_app):
    make_route, timeout = route_app
    calls = []
    opener = _inproc_opener({"api": make_route(calls)})
    with _http_error(307) as info:
        opener.open("inproc://api/go?code=307&to=/echo", data=b"x", timeout=timeout)
    assert info.value.d_body == b"moved"
    assert [c[1] for c in calls] == ["/go"]
    with opener.open("inproc://api/go?code=307&to=/echo", timeout=timeout) as resp:
        assert json.loads(resp.read())["method"] == "GET"


def test_redirect_max_redirections_ends_as_urllib(route_app):
    make_route, timeout = route_app
    calls = []
    opener = _inproc_opener({"api": make_route(calls)})
    with _http_error(302) as info:
        opener.open("inproc://api/chain/0", timeout=timeout)
    assert info.value.msg.startswith(urllib.request.HTTPRedirectHandler.inf_msg)
    assert len(calls) == urllib.request.HTTPRedirectHandler.max_redirections + 1
    del calls[:]
    with opener.open("inproc://api/chain/11", timeout=timeout) as resp:
        assert resp.read() == b"end of chain"
    assert len(calls) == 10


def test_redirect_custom_handler_rules_are_honoured(route_app):
    make_route, timeout = route_app
    calls = []
    redirector = RecordingRedirects()
    opener = _inproc_opener({"api": make_route(calls)}, redirector)
    with opener.open("inproc://api/go?code=302&to=/echo", timeout=timeout) as resp:
        assert json.loads(resp.read())["x-extra"] == "from-redirector"
    assert redirector.seen == [(302, "inproc://api/echo")]
    del calls[:]
    with _http_error(302):  # max_repeats = 1: the second visit ends it
        opener.open("inproc://api/loop", timeout=timeout)
    assert len(calls) == 2
    del calls[:]
    with _http_error(302):  # max_redirections = 3
        opener.open("inproc://api/chain/0", timeout=timeout)
    assert len(calls) == 4


@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_redirect_refused_by_redirect_request_is_httperror_as_urllib(route_app):
    make_route, timeout = route_app
    _compare(make_route, [("/go?code=302&to=/echo", {}), ("/go?code=301&to=echo", {})],
               timeout, RefusingRedirects)
    redirector = RefusingRedirects()
    opener = _inproc_opener({"api": make_route([])}, redirector)
    for location in ("/echo", "echo", "inproc://api/echo"):
        url = "inproc://api/go?" + urllib.parse.urlencode({"code": 302, "to": location})
        with _http_error(302) as info:
            opener.open(url, timeout=timeout)
        assert info.value.msg == "Found"  # not "... Redirection to url ... is not allowed"
        assert info.value.geturl() == url
        assert info.value.d_body == b"moved"
    # asked once per redirect, always with the absolute URL
    assert redirector.seen == ["inproc://api/echo"] * 3


def test_cookie_set_then_sent_back(route_app):
    make_route, timeout = route_app
    jar = http.cookiejar.CookieJar()
    opener = _inproc_opener({"api": make_route([])}, urllib.request.HTTPCookieProcessor(jar))
    with opener.open("inproc://api/set-cookie?sid=abc123", timeout=timeout) as resp:
        assert resp.headers["Set-Cookie"] == "sid=abc123; Path=/"
        resp.read()
    assert [c.name for c in jar] == ["sid"]
    with opener.open("inproc://api/echo", timeout=timeout) as resp:
        assert json.loads(resp.read())["cookie"] == "sid=abc123"
    with opener.open("inproc://api/set-cookie-redirect", timeout=timeout) as resp:
        cookie = json.loads(resp.read())["cookie"]
    assert sorted(cookie.split("; ")) == ["hop=1", "sid=abc123"]


@pytest.mark.parametrize("scheme, handler_class", [
    ("basic", urllib.request.HTTPBasicAuthHandler),
    ("digest", urllib.request.HTTPDigestAuthHandler),
])
def test_auth_with_password_for_inproc_url(route_app, scheme, handler_class):
    make_route, timeout = route_app
    calls = []
    auth = handler_class(_password_mgr("inproc://api/"))
    opener = _inproc_opener({"api": make_route(calls)}, auth)
    with _dropped_responses(), opener.open("inproc://api/" + scheme, timeout=timeout) as resp:
        assert resp.read() == b"welcome, " + scheme.encode()
    assert len(calls) == 2


@pytest.mark.parametrize("scheme, handler_class, reason", [
    ("basic", urllib.request.HTTPBasicAuthHandler, "Unauthorized"),
    ("digest", urllib.request.HTTPDigestAuthHandler, "digest auth failed"),
])
def test_auth_wrong_password_is_401(route_app, scheme, handler_class, reason):
    make_route, timeout = route_app
    auth = handler_class(_password_mgr("inproc://api/", "wrong"))
    opener = _inproc_opener({"api": make_route([])}, auth)
    with _dropped_responses():
        # _observe keeps no traceback alive: the responses urllib dropped
        # are released at once, not by a later garbage collection
        seen = _observe(opener, "inproc://api/" + scheme, timeout=timeout)
    assert seen[:3] == ("HTTPError", 401, reason)
    if scheme == "basic":
        assert ("www-authenticate", 'Basic realm="%s"' % _REALM) in seen[3]
        assert seen[4] == b"denied"


@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_auth_dropped_401_responses_do_not_warn(route_app):
    make_route, timeout = route_app
    with _loopback(make_route([])) as base, _dropped_responses() as caught:
        for handler_class, path in ((urllib.request.HTTPBasicAuthHandler, "/basic"),
                                    (urllib.request.HTTPDigestAuthHandler, "/digest")):
            with _net_opener(handler_class(_password_mgr(base + "/"))).open(
                    base + path, timeout=WAIT) as resp:
                resp.read()
            gc.collect()
            assert [str(w.message) for w in caught] == []  # http:// is silent
            opener = _inproc_opener({"api": make_route([])},
                                      handler_class(_password_mgr("inproc://api/")))
            with opener.open("inproc://api" + path, timeout=timeout) as resp:
                resp.read()
            gc.collect()
            assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_intercept_serves_mounted_hosts_with_their_scheme_and_host(kind_timeout):
    calls, hosts, seen = [], [], []
    opener = _intercept_opener({"API.internal": _environ_app(calls, hosts)}, seen)
    cases = [("http://api.internal/a", "http", ("api.internal", "80")),
             ("https://api.internal/b?x=1", "https", ("api.internal", "443")),
             ("http://API.Internal/c", "http", ("API.Internal", "80")),
             ("http://api.internal:80/d", "http", ("api.internal:80", "80")),
             ("https://api.internal:443/e", "https", ("api.internal:443", "443"))]
    for url, scheme, host in cases:
        with opener.open(url, timeout=kind_timeout) as resp:
            assert resp.geturl() == url
            resp.read()
        assert calls[-1]["wsgi.url_scheme"] == scheme
        assert hosts[-1] == host
    assert len(calls) == len(cases) and seen == []


def test_intercept_handler_class_sees_host_it_was_called_with():
    seen_by_app, fell = [], []
    opener = _intercept_opener({"api.internal": make_app("handler", _host_seer(seen_by_app))}, fell)
    for url in ("http://api.internal/x", "https://API.internal:443/y"):
        with opener.open(url) as resp:
            assert resp.status == 204
    assert [s[0] for s in seen_by_app] == ["api.internal", "API.internal:443"]
    assert fell == []


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_intercept_other_hosts_and_ports_fall_through(kind_timeout):
    calls, fell = [], []
    opener = _intercept_opener(
        {"api.internal": _environ_app(calls), "ported.internal:8080": _environ_app(calls)}, fell)
    misses = ["http://api.internal:8080/", "https://api.internal:80/", "http://api.internal:443/",
              "http://api.internal.evil.com/", "http://evil.com/api.internal",
              "http://api.internal@evil.com/", "https://xapi.internal/",
              "http://ported.internal/", "http://ported.internal:80/", "https://ported.internal/"]
    for url in misses:
        with pytest.raises(urllib.error.URLError) as info, opener.open(url, timeout=kind_timeout):
            pass
        assert not isinstance(info.value, urllib.error.HTTPError)
    assert fell == misses
    with opener.open("http://ported.internal:8080/hit", timeout=kind_timeout) as resp:
        resp.read()
    assert [c["PATH_INFO"] for c in calls] == ["/hit"]


def test_intercept_off_by_default():
    fell, calls = [], []
    opener = _inproc_opener({"api.internal": _environ_app(calls)}, FallThroughHTTP(fell))
    with pytest.raises(urllib.error.URLError):
        opener.open("http://api.internal/")
    assert fell == ["http://api.internal/"] and calls == []


def test_intercept_passes_unmounted_loopback_untouched(route_app):
    make_route, timeout = route_app
    inproc_calls = []
    with _loopback(_RequestEchoHandler) as base:
        plain = _net_opener()
        intercepting = _inproc_opener({"api.internal": make_route(inproc_calls),
                                         "localhost": make_route(inproc_calls)},
                                        intercept_http=True)
        for path, kw in (("/x?y=1", {}), ("/p", {"data": b"abc"}),
                         ("/h", {"headers": {"X-A": "b"}})):
            expected = _observe(plain, base + path, **kw)
            assert _observe(intercepting, base + path, **kw) == expected
        # the mounted host next to it is still served in-process
        with intercepting.open("http://api.internal/echo", timeout=timeout) as resp:
            assert json.loads(resp.read())["path"] == "/echo"
    assert [c[1] for c in inproc_calls] == ["/echo"]


def test_intercept_redirect_within_bridge_uses_http_rules(route_app):
    make_route, timeout = route_app
    calls = []
    opener = _inproc_opener({"api.internal": make_route(calls)}, intercept_http=True)
    with opener.open("http://api.internal/go?code=302&to=echo", data=b"q", timeout=timeout) as resp:
        assert resp.geturl() == "http://api.internal/echo"
        assert json.loads(resp.read())["method"] == "GET"
    with _http_error(302) as info:
        opener.open("https://api.internal/loop", timeout=timeout)
    assert "infinite loop" in info.value.msg


def test_intercept_redirects_between_inproc_and_intercepted_hosts(route_app):
    make_route, timeout = route_app
    calls = []
    app = make_route(calls)
    opener = _inproc_opener({"api": app, "api.internal": app}, intercept_http=True)
    hops = [("inproc://api/go?", "http://api.internal/echo"),
            ("http://api.internal/go?", "inproc://api/echo"),
            ("https://api.internal/go?", "inproc://api/echo?z=1")]
    for start, to in hops:
        url = start + urllib.parse.urlencode({"code": 302, "to": to})
        with opener.open(url, timeout=timeout) as resp:
            assert resp.geturl() == to
            assert json.loads(resp.read())["path"] == "/echo"
    assert [c[1] for c in calls] == ["/go", "/echo"] * 3


def test_intercept_redirect_loop_across_schemes_ends_as_urllib(route_app):
    make_route, timeout = route_app
    calls = []
    app = make_route(calls)
    opener = _inproc_opener({"api": app, "api.internal": app}, intercept_http=True)
    with _http_error(302) as info:
        opener.open("inproc://api/ping", timeout=timeout)
    assert info.value.msg.startswith(urllib.request.HTTPRedirectHandler.inf_msg)
    # one redirect_dict across both schemes: each URL is followed max_repeats
    # (4) times, the 9th response ends it
    assert [c[1] for c in calls] == ["/ping", "/pong"] * 4 + ["/ping"]


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_xmlrpc_round_trip_matches_loopback(kind_timeout):
    with _rpc_server(bind=True) as net_server:
        port = net_server.server_address[1]
        with xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % port, allow_none=True) as proxy:
            expected = _rpc_session(proxy)
    with _rpc_server(bind=False) as server:
        handler = ib.InProcHandler()
        handler.mount("rpc", xmlrpc.server.SimpleXMLRPCRequestHandler, server=server)
        opener = urllib.request.build_opener(handler)
        transport = OpenerTransport(opener, "inproc", timeout=kind_timeout)
        with xmlrpc.client.ServerProxy("http://rpc/RPC2", transport=transport,
                                       allow_none=True) as proxy:
            got = _rpc_session(proxy)
            assert proxy.source() is None
    assert got == expected
    assert expected[0] == 1024 and expected[2] == 3.5


def test_xmlrpc_over_interception_with_source():
    with _rpc_server(bind=False) as server:
        factory = ib.OpenerFactory(intercept_http=True)
        factory.mount("rpc.internal", xmlrpc.server.SimpleXMLRPCRequestHandler, server=server)
        fell = []
        opener = factory.opener_for(FallThroughHTTP(fell), source=ib.SOURCE_AGENTS)
        transport = OpenerTransport(opener, "http", timeout=5)
        with xmlrpc.client.ServerProxy("http://rpc.internal/RPC2", transport=transport,
                                       allow_none=True) as proxy:
            assert proxy.pow(3, 4) == 81
            assert proxy.source() == "agents"
        with xmlrpc.client.ServerProxy("http://rpc.internal/not-rpc", transport=transport) as bad:
            with pytest.raises(xmlrpc.client.ProtocolError) as info:
                bad.pow(1, 1)
        assert info.value.errcode == 404
    assert fell == []


# ---------------------------------------------------------------------------
# Differential: loopback vs in-process
# ---------------------------------------------------------------------------


def test_diff_simplehttp_files_listing_and_errors(docroot):
    app = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(docroot))
    mtime = os.stat(docroot / "hello.txt").st_mtime
    later = email.utils.formatdate(mtime + 3600, usegmt=True)
    earlier = email.utils.formatdate(mtime - 3600, usegmt=True)
    requests = [
        ("/hello.txt", {}),
        ("/page.html", {}),
        ("/hello.txt", {"method": "HEAD"}),
        ("/caf%C3%A9.txt", {}),
        ("/missing.txt", {}),
        ("/sub", {}),  # 301 to /sub/, followed by urllib on both
        ("/sub?x=1", {}),
        ("/sub/", {}),
        ("/", {}),
        ("/sub/inner.txt", {}),
        ("/hello.txt", {"headers": {"If-Modified-Since": later}}),  # 304
        ("/hello.txt", {"headers": {"If-Modified-Since": earlier}}),
        ("/hello.txt", {"method": "DELETE"}),  # 501
        ("/hello.txt", {"method": "PUT"}),
    ]
    with _loopback(app) as base:
        net, inproc = _net_opener(), _inproc_opener({"api": app})
        for path, kw in requests:
            expected = _observe(net, base + path, **kw)
            got = _observe(inproc, "inproc://api" + path, **kw)
            assert got == expected, (path, kw)
    # the cases meant something
    assert _observe(inproc, "inproc://api/sub")[1:2] == (200,)
    assert _observe(inproc, "inproc://api/sub")[-1] == "/sub/"
    not_modified = _observe(inproc, "inproc://api/hello.txt", headers={"If-Modified-Since": later})
    assert not_modified[:2] == ("HTTPError", 304)
    assert _observe(inproc, "inproc://api/x", method="DELETE")[:2] == ("HTTPError", 501)


def test_diff_handler_hand_written_framing():
    requests = [(p, {}) for p in ("/chunked", "/close", "/sized")]
    requests.append(("/chunked", {"method": "HEAD"}))
    with _loopback(_HandWrittenFramingHandler) as base:
        net, inproc = _net_opener(), _inproc_opener({"api": _HandWrittenFramingHandler})
        for path, kw in requests:
            assert _observe(inproc, "inproc://api" + path, **kw) == _observe(
                net, base + path, **kw), path
    ok = _observe(inproc, "inproc://api/chunked")
    assert ok[4] == b"first second;" + b"x" * 5000
    assert ("transfer-encoding", "chunked") in ok[3]


def test_diff_handler_send_error():
    requests = [("/teapot", {}), ("/unavailable", {}), ("/bad", {}), ("/nope", {}),
                ("/teapot", {"method": "HEAD"})]
    with _loopback(_SendErrorHandler) as base:
        net, inproc = _net_opener(), _inproc_opener({"api": _SendErrorHandler})
        for path, kw in requests:
            got = _observe(inproc, "inproc://api" + path, **kw)
            assert got == _observe(net, base + path, **kw), path
            assert got[0] == "HTTPError"
    teapot = _observe(inproc, "inproc://api/teapot")
    assert teapot[1:3] == (418, "Short and stout")
    assert b"Tip me over and pour me out" in teapot[4]


@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_diff_redirects_loops_and_chains(route_app):
    make_route, timeout = route_app
    to = urllib.parse.quote
    requests = [
        ("/go?code=302&to=echo", {}),
        ("/dir/go?code=301&to=" + to("../echo?q=1"), {}),
        ("/go?code=301&to=/echo", {"data": b"a=1"}),
        ("/go?code=302&to=/echo", {"data": b"a=2", "headers": {"X-Extra": "kept"}}),
        ("/go?code=303&to=/echo", {"data": b"a=3"}),
        ("/go?code=307&to=/echo", {}),
        ("/go?code=307&to=/echo", {"data": b"a=4"}),  # urllib refuses: HTTPError 307
        ("/go?code=308&to=/echo", {}),  # followed on 3.11+, HTTPError before
        ("/go?code=302&to=/echo", {"method": "HEAD"}),
        ("/go?code=302&to=" + to("/echo/caf\u00c3\u00a9 x", encoding="latin-1"), {}),
        ("/loop", {}),
        ("/chain/0", {}),
        ("/chain/12", {}),
        ("/teapot", {}),
    ]
    calls = _compare(make_route, requests, timeout)
    assert calls.count(("GET", "/loop", "", b"")) == 5
    assert ("GET", "/echo/caf\u00c3\u00a9 x", "", b"") in calls


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_diff_wsgi_demo_app(kind_timeout):
    app = wsgiref.validate.validator(wsgiref.simple_server.demo_app)
    with _loopback(app) as base:
        net = _observe(_net_opener(), base + "/demo?x=1")
        got = _observe(_inproc_opener({"api": app}), "inproc://api/demo?x=1", timeout=kind_timeout)
    assert got[:3] == net[:3] == ("ok", 200, "OK")
    # the validator's iterator has no len(): neither server adds a Content-Length
    assert got[3] == net[3] == [("content-type", "text/plain; charset=utf-8")]
    for obs in (got, net):
        assert obs[4].startswith(b"Hello world!\n\n")
        assert b"\nPATH_INFO = '/demo'\n" in obs[4] and b"\nQUERY_STRING = 'x=1'\n" in obs[4]
        assert b"\nREQUEST_METHOD = 'GET'\n" in obs[4]
    # wsgiref copies the process environment into environ; the bridge must not
    cgi = ("PATH_INFO", "QUERY_STRING", "SCRIPT_NAME", "REMOTE_ADDR", "CONTENT_TYPE",
           "CONTENT_LENGTH")
    host_env = [k for k in wsgiref.handlers.BaseHandler.os_environ
                if k not in cgi and not k.startswith(("HTTP_", "SERVER_", "REQUEST_", "wsgi."))]
    assert host_env  # wsgiref took a copy at import time
    assert any(("\n%s = " % k).encode("latin-1", "replace") in net[4] for k in host_env)
    assert [k for k in host_env if ("\n%s = " % k).encode("latin-1", "replace") in got[4]] == []


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_diff_wsgi_unicode_paths_and_queries(kind_timeout):
    paths = [
        "/caf%C3%A9",
        "/%E2%82%AC%20x/y",
        "/a%2Fb/c",
        "/%FF%FE/%00",
        "/%7Euser/;param=1",
        "/q?name=%C3%A9t%C3%A9&x=1+2&raw=%E2%82%AC&empty",
        "/q?",
        "/",
    ]
    calls = _compare(_environ_app, [(p, {}) for p in paths], kind_timeout)
    assert len(calls) == len(paths)
    for path, seen in zip(paths, calls):
        raw_path, _, query = path.partition("?")
        assert seen["PATH_INFO"] == urllib.parse.unquote_to_bytes(raw_path).decode("latin-1")
        assert seen["QUERY_STRING"] == query
    assert calls[0]["PATH_INFO"] == "/caf\u00c3\u00a9"


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_diff_wsgi_framing_and_errors(kind_timeout, caplog):
    paths = ["/one", "/many", "/empty", "/gen", "/no-content", "/boom"]
    requests = [(p, {}) for p in paths] + [(p, {"method": "HEAD"}) for p in ("/one", "/many")]
    with caplog.at_level("CRITICAL", logger="inproc_bridge"):
        _compare(_framing_wsgi, requests, kind_timeout)
    opener = _inproc_opener({"api": _framing_wsgi([])})
    assert _observe(opener, "inproc://api/empty", timeout=kind_timeout)[3] == [
        ("content-type", "text/plain"), ("x-path", "/empty"), ("content-length", "0")]
    # wsgiref sends its headers on the first (empty) chunk, against PEP 3333;
    # the bridge waits for the iterable to end and sends a Content-Length of 0
    assert _observe(opener, "inproc://api/empty-chunks", timeout=kind_timeout)[3:5] == (
        [("content-type", "text/plain"), ("x-path", "/empty-chunks"), ("content-length", "0")], b"")
    boom = _observe(opener, "inproc://api/boom", timeout=kind_timeout)
    assert boom[:3] == ("HTTPError", 500, "Internal Server Error")


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_diff_wsgi_request_headers_and_bodies(kind_timeout):
    requests = [
        ("/get", {}),
        ("/post", {"data": b"a=1&b=2"}),
        ("/typed", {"data": b"{}", "headers": {"Content-Type": "application/json"}}),
        ("/put", {"data": b"payload", "method": "PUT"}),
        ("/hdr", {"headers": {"X-Custom": "v1", "Accept": "text/plain",
                              "User-Agent": "d-agent/1.0"}}),
        ("/latin", {"headers": {"X-Latin": "caf\u00e9"}}),
    ]
    calls = _compare(_environ_app, requests, kind_timeout)
    assert calls[1]["CONTENT_LENGTH"] == "7" and calls[1]["body"] == "a=1&b=2"
    assert calls[0]["HTTP_USER_AGENT"] == "Python-urllib/%d.%d" % sys.version_info[:2]


@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_diff_wsgi_header_value_whitespace_stripped(kind_timeout):
    calls = _compare(_environ_app, [("/spaces", {"headers": {"X-Pad": "  padded \t"}})],
                       kind_timeout)
    assert calls[0]["HTTP_X_PAD"] == "padded"


@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_diff_raw_non_ascii_url_refused_alike(app_kind, kind_timeout):
    calls = []
    app = make_app("handler", _route_logic(calls)) if app_kind == "handler" else _environ_app(calls)
    with _loopback(app) as base:
        expected = _error(_net_opener(), base + "/caf\u00e9")
    got = _error(_inproc_opener({"api": app}), "inproc://api/caf\u00e9", timeout=kind_timeout)
    assert expected is UnicodeEncodeError
    assert got is expected
    assert calls == []


def test_diff_handler_sees_request_as_sent_on_the_wire(tmp_path):
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"file body " * 1000)
    requests = [
        ("/get?x=1", dict),
        ("/post", lambda: {"data": b"a=1"}),
        ("/typed", lambda: {"data": b"[]", "headers": {"Content-Type": "application/json"}}),
        ("/hdr", lambda: {"headers": {"X-A": "1", "User-Agent": "d-agent", "Source": "spoof"}}),
        ("/bytearray", lambda: {"data": bytearray(b"ba")}),
        ("/file", lambda: {"data": io.BytesIO(b"from a file object")}),
        ("/iter", lambda: {"data": _chunks()}),
        ("/list", lambda: {"data": [b"one", b"two"]}),
        ("/sized-iter", lambda: {"data": iter([b"abc"]), "headers": {"Content-Length": "3"}}),
        ("/put", lambda: {"data": b"p", "method": "PUT"}),
    ]
    with _loopback(_RequestEchoHandler) as base:
        net, inproc = _net_opener(), _inproc_opener({"api": _RequestEchoHandler})
        for path, kw in requests:
            expected = _observe(net, base + path, **kw())
            got = _observe(inproc, "inproc://api" + path, **kw())
            assert got == expected, path
        with upload.open("rb") as net_f, upload.open("rb") as inproc_f:
            assert _observe(inproc, "inproc://api/real-file", data=inproc_f) == _observe(
                net, base + "/real-file", data=net_f)
    chunked = _observe(inproc, "inproc://api/iter", data=_chunks())[4]
    assert b"Transfer-Encoding: chunked" in chunked
    assert chunked.endswith(b"\n\n6\r\nalpha,\r\n5\r\nbeta,\r\n5\r\ngamma\r\n0\r\n\r\n")


@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_diff_redirect_custom_handler_rules(route_app):
    make_route, timeout = route_app
    _compare(make_route, [("/go?code=302&to=/echo", {}), ("/loop", {}), ("/chain/0", {}),
                          ("/chain/17", {})], timeout, RecordingRedirects)


@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_diff_cookie_processor(route_app):
    make_route, timeout = route_app
    jar_factory = lambda: urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())  # noqa: E731
    _compare(make_route, [("/echo", {}), ("/set-cookie?a=1&b=2", {}), ("/echo", {}),
                          ("/set-cookie-redirect", {}), ("/echo", {"data": b"z"})],
               timeout, jar_factory)


@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_diff_auth_basic_and_digest(route_app):
    make_route, timeout = route_app
    net_calls, inproc_calls = [], []
    with _loopback(make_route(net_calls)) as base, _dropped_responses():
        for handler_class in (urllib.request.HTTPBasicAuthHandler,
                              urllib.request.HTTPDigestAuthHandler):
            for password in (_PASS, "wrong"):
                for path in ("/basic", "/digest"):
                    net = _net_opener(handler_class(_password_mgr(base + "/", password)))
                    inproc = _inproc_opener(
                        {"api": make_route(inproc_calls)},
                        handler_class(_password_mgr("inproc://api/", password)))
                    expected = _outcome(net, base + path)
                    assert _outcome(inproc, "inproc://api" + path, timeout=timeout) == expected
    assert [c[1] for c in inproc_calls] == [c[1] for c in net_calls]


# ---------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", [
    "inproc://api/echo",
    "inproc://API/echo",
    "http://api.internal/echo",
    "https://api.internal/echo",
    "HTTP://API.INTERNAL:80/echo",
    "https://api.internal:443/",
    # urllib un-percent-encodes the host: these are api.internal too
    "http://api%2einternal/echo",
    "http://%61pi.internal/echo",
    "http://api.internal:%38%30/echo",
    "https://api%2Einternal/echo",
])
def test_security_network_response_cannot_redirect_into_bridge(code, location):
    calls, fell = [], []
    apps = {"api": make_app("wsgi-inline", _route_logic(calls)),
            "api.internal": make_app("handler", _route_logic(calls))}
    with _loopback(_network_redirector(location, code)) as base:
        intercepting = _intercept_opener(apps, fell)
        with _http_error(code):
            intercepting.open(base + "/start", timeout=WAIT)
        plain = _inproc_opener(apps, FallThroughHTTP(fell), FallThroughHTTPS(fell))
        followed = code != 308 or hasattr(urllib.request.HTTPRedirectHandler, "http_error_308")
        if location.lower().startswith("inproc:") or not followed:
            with _http_error(code):
                plain.open(base + "/start", timeout=WAIT)
        else:
            # without interception that host is the network's: followed there
            with pytest.raises(urllib.error.URLError) as info:
                plain.open(base + "/start", timeout=WAIT)
            assert not isinstance(info.value, urllib.error.HTTPError)
            assert len(fell) == 1
    assert calls == []


def test_security_network_redirect_chain_cannot_reach_bridge():
    calls = []
    apps = {"api.internal": make_app("wsgi-inline", _route_logic(calls))}
    with _loopback(_network_redirector("http://api.internal/echo")) as inner:
        with _loopback(_network_redirector(inner + "/hop")) as outer:
            opener = _intercept_opener(apps, [])
            with _http_error(302) as info:
                opener.open(outer + "/start", timeout=WAIT)
    assert info.value.geturl().startswith(inner)
    assert calls == []


def test_security_inproc_to_network_to_inproc_is_blocked(route_app):
    make_route, timeout = route_app
    calls, fell = [], []
    app = make_route(calls)
    with _loopback(_network_redirector("inproc://api/echo")) as to_inproc, \
            _loopback(_network_redirector("http://api.internal/echo")) as to_intercepted:
        opener = _intercept_opener({"api": app, "api.internal": app}, fell)
        for network in (to_inproc, to_intercepted):
            url = "inproc://api/go?" + urllib.parse.urlencode({"code": 302, "to": network + "/x"})
            with _http_error(302) as info:
                opener.open(url, timeout=timeout)
            assert info.value.geturl() == network + "/x"
    # only the two first hops reached the app; the network's redirects did not
    assert [c[1] for c in calls] == ["/go", "/go"]
    assert fell == []


@pytest.mark.parametrize("url", [
    "inproc://api.evil/echo", "inproc://evil/api", "inproc://api@evil/echo",
    "inproc://evil@api/echo", "inproc://ap/echo", "inproc://apii/echo", "inproc://api./echo",
    "inproc:///api/echo", "inproc://api%2Fx/echo",
])
def test_security_exact_host_matching(url):
    calls = []
    opener = _inproc_opener({"api": make_app("wsgi-inline", _route_logic(calls))})
    with pytest.raises(urllib.error.URLError) as info, opener.open(url):
        pass
    assert not isinstance(info.value, urllib.error.HTTPError)
    assert calls == []


_HEADER_INJECTIONS = ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\r\n\r\nGET / HTTP/1.1", "a\r\n"]
_URL_INJECTIONS = ["/a b", "/a\r\nX-Injected: 1", "/a\nb", "/a\x00b", "/a\x7fb", "/a\tb",
                   "/q?x=1 HTTP/1.1\r\nX: y"]


@pytest.mark.parametrize("path, request_args, error", [
    *(("/echo", {"headers": {"X-Bad": v}}, ValueError) for v in _HEADER_INJECTIONS),
    ("/echo", {"headers": {"X-Bad": "a\x00b"}}, ValueError),
    *((path, {}, http.client.InvalidURL) for path in _URL_INJECTIONS),
    ("/echo", {"method": "GET\r\nX: y"}, ValueError),
    ("/echo", {"headers": {"X-U": "\u20ac"}}, UnicodeEncodeError),
], ids=[*("header-" + v for v in _HEADER_INJECTIONS), "header-nul",
        *("url-" + p for p in _URL_INJECTIONS), "method-crlf", "header-non-latin1"])
def test_security_request_with_bad_characters_is_refused(route_app, path, request_args, error):
    make_route, timeout = route_app
    calls = []
    opener = _inproc_opener({"api": make_route(calls)})
    _refused(opener, urllib.request.Request("inproc://api" + path, **request_args), timeout, error)
    assert calls == []


_DIFF_HEADER_INJECTIONS = ["a\r\nX-Injected: 1", "a\nb", "a\r\n\r\nGET / HTTP/1.1"]
_DIFF_URL_INJECTIONS = ["/a b", "/a\r\nX: 1", "/a\x00b"]


@pytest.mark.parametrize("path, headers, error", [
    *(("/echo", {"X-Bad": v}, ValueError) for v in _DIFF_HEADER_INJECTIONS),
    *((path, {}, http.client.InvalidURL) for path in _DIFF_URL_INJECTIONS),
], ids=[*("header-" + v for v in _DIFF_HEADER_INJECTIONS),
        *("url-" + p for p in _DIFF_URL_INJECTIONS)])
def test_diff_security_bad_characters_refused_alike(path, headers, error):
    calls = []
    app = make_app("handler", _route_logic(calls))
    with _loopback(app) as base:
        expected = _error(_net_opener(), base + path, headers=headers)
    assert expected is error
    assert _error(_inproc_opener({"api": app}), "inproc://api" + path, headers=headers) is expected
    assert calls == []


def test_security_source_header_cannot_forge_source(app_kind, kind_timeout):
    """Source and actor come from the opener (current_source(), the environ,
    the scope), never from a request header, which the app sees as sent."""
    seen = []

    def logic(req):
        seen.append((ib.current_source(), ib.current_actor(), req.tags,
                     req.headers["Source"], req.headers["X-Inproc-Source"]))
        return 204, [], []

    def tags(source, actor):
        return None if app_kind == "handler" else (source, actor)

    with ib.OpenerFactory({"api": make_app(app_kind, logic)}) as factory:
        for opener, source, actor in ((factory.opener_for(), None, None),
                                      (factory.opener_for(source=ib.SOURCE_AGENTS,
                                                          actor="user-7"), "agents", "user-7")):
            req = urllib.request.Request("inproc://api/", headers=_SPOOF)
            with opener.open(req, timeout=kind_timeout) as resp:
                resp.read()
            assert seen[-1] == (source, actor, tags(source, actor), "billing", "billing")
    with Bridge({"api": make_app(app_kind, logic)}, source="billing-job") as (opener, _):
        req = urllib.request.Request("inproc://api/", headers={"Source": "forged",
                                                               "X-Inproc-Source": "f"})
        with opener.open(req, timeout=kind_timeout) as resp:
            resp.read()
    assert seen[-1] == ("billing-job", None, tags("billing-job", None), "forged", "f")
    assert isinstance(seen[-1][0], ib.Source)


# ---------------------------------------------------------------------------
# ASGI: recognition, scope, lifespan, loop, disconnect
# ---------------------------------------------------------------------------


def test_asgi_recognised_and_marker():
    async def coro_app(scope, receive, send):
        pass

    class Instance:
        async def __call__(self, scope, receive, send):
            pass

    def wsgi_app(environ, start_response):
        return []

    def sync_wrapper(scope, receive, send):  # returns a coroutine: detection says WSGI
        return coro_app(scope, receive, send)

    assert ib._app_kind(coro_app) == "asgi"
    assert ib._app_kind(Instance()) == "asgi"
    assert ib._app_kind(functools.partial(coro_app)) == "asgi"
    assert ib._app_kind(functools.partial(functools.partial(Instance()))) == "asgi"
    assert ib._app_kind(wsgi_app) == "wsgi"
    assert ib._app_kind(Instance) == "wsgi"  # a class is never ASGI 3
    assert ib._app_kind(sync_wrapper) == "wsgi"
    assert ib._app_kind(ib.ASGIApp(sync_wrapper)) == "asgi"
    assert "ASGIApp" in ib.__all__
    with pytest.raises(TypeError):
        ib.ASGIApp(42)

    seen = []
    marked = ib.ASGIApp(functools.partial(lambda s, r, se: _asgi_app(seen=seen)(s, r, se)))
    with Bridge({"api": marked}) as (opener, _):
        with opener.open("inproc://api/x", timeout=WAIT) as resp:
            assert resp.read() == b"ok"
    assert seen[0]["path"] == "/x"


def test_asgi_scope_as_a_server_builds_it():
    seen = []
    with ib.OpenerFactory({"api": _asgi_app(seen=seen)}) as factory:
        opener = factory.opener_for(source=ib.SOURCE_AGENTS, actor="user-7")
        req = urllib.request.Request(
            "inproc://API/caf%C3%A9/a%2Fb?q=1&r=%20", data=b"hello",
            headers={"X-Thing": "v1", "Content-Type": "text/plain"}, method="PUT")
        with opener.open(req, timeout=WAIT) as resp:
            assert resp.status == 200 and resp.reason == "OK"
            assert resp.getheader("Content-Type") == "text/plain"
            assert resp.getheader("Date")
            assert resp.read() == b"ok"
    scope = seen[0]
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "PUT"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/café/a/b"
    assert scope["raw_path"] == b"/caf%C3%A9/a%2Fb"
    assert scope["query_string"] == b"q=1&r=%20"
    assert scope["root_path"] == ""
    headers = scope["headers"]
    assert all(type(n) is bytes and type(v) is bytes and n == n.lower() for n, v in headers)
    assert (b"x-thing", b"v1") in headers
    assert (b"content-type", b"text/plain") in headers
    assert (b"content-length", b"5") in headers
    assert (b"host", b"API") in headers
    assert any(n == b"user-agent" for n, _ in headers)
    assert scope["client"] == ("127.0.0.1", 0)
    assert scope["server"] == ("api", 80)
    assert scope["extensions"]["inproc"] == {"source": "agents", "actor": "user-7"}
    assert "state" not in scope  # no lifespan state


def test_asgi_intercepted_https_scope():
    seen = []
    with Bridge({"api.internal:8443": _asgi_app(seen=seen)}, intercept_http=True) as (opener, _):
        with opener.open("https://api.internal:8443/v1", timeout=WAIT) as resp:
            assert resp.read() == b"ok"
    assert seen[0]["scheme"] == "https"
    assert seen[0]["server"] == ("api.internal", 8443)


def test_asgi_lifespan_startup_state_and_shutdown():
    app = LifespanApp()
    with Bridge({}) as (opener, handler):
        handler.mount("api", app)
        assert app.events == ["lifespan.startup"]
        for _ in range(2):
            with opener.open("inproc://api/", timeout=WAIT) as resp:
                assert resp.read() == b"[('db', 'connected')]"
        # One app under two names starts once and stops with its last name.
        handler.mount("api:8080", app)
        assert app.events == ["lifespan.startup"]
        handler.unmount("api")
        assert not app.shutdown.is_set()
        handler.unmount("api:8080")
        assert app.shutdown.is_set()
        assert app.events == ["lifespan.startup", "lifespan.shutdown"]
    opted_out = LifespanApp()
    with Bridge({"api": ib.ASGIApp(opted_out, lifespan=False)}) as (opener, _):
        with opener.open("inproc://api/", timeout=WAIT) as resp:
            assert resp.read() == b"no state"
    assert opted_out.events == []


def test_asgi_lifespan_failure_makes_mount_raise():
    app = LifespanApp(fail="no database")
    with Bridge({}) as (opener, handler):
        with pytest.raises(ib.BridgeError) as info:
            handler.mount("api", app)
        assert "no database" in str(info.value)
        with pytest.raises(ib.BridgeError):
            opener.open("inproc://api/", timeout=WAIT)  # not mounted
    with pytest.raises(ib.BridgeError):
        ib.InProcHandler({"api": LifespanApp(fail="bad config")})


def test_asgi_lifespan_unsupported_is_fine(caplog):
    seen = []

    async def reads_first(scope, receive, send):
        message = await receive()  # lifespan.startup: then it raises, as a sloppy app would
        await _send(send, message.get("body", b""))

    with Bridge({"api": _asgi_app(seen=seen)}) as (opener, handler):  # raises on "lifespan"
        with opener.open("inproc://api/", timeout=WAIT) as resp:
            assert resp.read() == b"ok"
        handler.unmount("api")
        with caplog.at_level(logging.WARNING, logger="inproc_bridge"):
            handler.mount("sloppy", reads_first)
        assert "without lifespan" in caplog.records[0].getMessage()
        with opener.open("inproc://sloppy/", data=b"echo", timeout=WAIT) as resp:
            assert resp.read() == b"echo"
    assert "state" not in seen[0]


def test_asgi_close_stops_the_loop_thread():
    app = LifespanApp()
    record = {}

    async def where(scope, receive, send):
        assert scope["type"] == "http"
        record["thread"] = threading.current_thread()
        await _send(send, b"")

    def wsgi_app(environ, start_response):
        start_response("200 OK", [])
        return [b"wsgi"]

    handler = ib.InProcHandler({"api": app, "where": where, "wsgi": wsgi_app})
    opener = urllib.request.build_opener(handler)
    with opener.open("inproc://where/", timeout=WAIT) as resp:
        resp.read()
    thread = record["thread"]
    assert thread.daemon and thread.is_alive()
    handler.close()
    assert not thread.is_alive()
    assert app.shutdown.is_set()
    handler.close()  # idempotent
    with pytest.raises(ib.BridgeError):
        opener.open("inproc://where/", timeout=WAIT)
    with pytest.raises(ib.BridgeError):
        handler.mount("again", where)
    with opener.open("inproc://wsgi/", timeout=WAIT) as resp:  # owns nothing: still served
        assert resp.read() == b"wsgi"

    # An opener's handler leaves the loop to its factory.
    with ib.OpenerFactory({"where": where}) as factory:
        opener = factory.opener_for()
        for handler in opener.handlers:
            handler.close()
        with opener.open("inproc://where/", timeout=WAIT) as resp:
            resp.read()
        thread = record["thread"]
    assert not thread.is_alive()


def test_asgi_close_drops_requests_in_flight():
    record, started = {}, threading.Event()

    async def endless(scope, receive, send):
        assert scope["type"] == "http"
        await _send(send, b"tick\n", more=True)
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            record["cancelled"] = True
            raise

    with Bridge({"api": endless}) as (opener, handler):
        with opener.open("inproc://api/", timeout=WAIT) as resp:
            assert resp.readline() == b"tick\n"
            assert started.wait(WAIT)
            handler.close()
            with pytest.raises(OSError):
                resp.read()
    assert record["cancelled"]


def test_asgi_close_lets_an_answered_request_finish_its_work():
    # Starlette's BackgroundTask, Django's response.close(): work after the
    # response is complete.  A server's shutdown waits for it; so does close(),
    # up to ASGI_CLOSE_GRACE.
    record = {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        await _send(send, b"done")
        try:
            await asyncio.sleep(0.2)  # the app's own work, not the test's wait
            record["after"] = "finished"
        except asyncio.CancelledError:
            record["after"] = "cancelled"
            raise

    with Bridge({"api": app}) as (opener, handler):
        with opener.open("inproc://api/", timeout=WAIT) as resp:
            assert resp.read() == b"done"
        handler.close()
        assert record == {"after": "finished"}


def test_asgi_loop_stops_when_the_bridge_is_collected():
    record = {}

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        record["thread"] = threading.current_thread()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    # A throw-away opener: the stream must outlive it.
    resp = urllib.request.build_opener(ib.InProcHandler({"api": app})).open(
        "inproc://api/", timeout=WAIT)
    with resp:
        gc.collect()
        assert resp.read() == b"012"
    del resp
    gc.collect()
    record["thread"].join(WAIT)
    assert not record["thread"].is_alive()


# ---------------------------------------------------------------------------
# Recording and faults: helpers
# ---------------------------------------------------------------------------
# Where the SPEC is silent, these tests take what a user of urllib and
# http.server would expect:
#
# Recording
# - A Call is live: the object bridge.calls hands out is the one the bridge
#   updates ("open" -> outcome), so a test may hold it and wait for its outcome.
#   The outcome, once set, is final: a call that timed out stays "timeout" when
#   its app finishes afterwards.
# - "complete" is the outcome of a response read to its end and closed,
#   whatever its status: an HTTPError 404 read to the end is "complete" (an HTTP
#   error status is an answer, not an app error).  Outcomes are waited for
#   (bounded by WAIT): the app side may end a moment after the caller's last read.
# - An app that raises before its head: the caller gets the bridge's 500, and the
#   call records that head: status 500, outcome "app-error".
# - call.url is the absolute URL of that one request; a followed redirect is two
#   calls, the second with the joined target ("inproc://api/new?y=2"), the
#   method urllib's redirect handler chose (GET after a 302 to a POST) and
#   request_body b"".  call.mount is the name the serving app was mounted as
#   ("api.internal" for http://api.internal/... under intercept_http=True), and
#   the call is recorded on the bridge that served it.
# - request_body of a request without a body is b""; of a chunked request body
#   (a file or an iterable) it is the payload, without the chunk framing.
#   response_body is the body as the caller reads it: a handler class's chunked
#   framing is decoded.  64 KiB is 65,536 bytes; caller and app still get all.
# - Header names and values in request_headers and response_headers are str on
#   every path (an ASGI app's bytes decoded); the tests compare names
#   case-insensitively.  request_headers hold every header the app received;
#   response_headers hold at least the headers the app sent (whether the
#   bridge's own Date/Server are in them is left open).
# - status is None and seconds None while the head is not out; started lies
#   between the caller's open() and its return; seconds is a float >= 0.
# - bridge.calls behaves like a list for len(), [i] (negative i from the newest;
#   IndexError out of range) and iteration; a thread's calls keep its order.
#   factory.calls holds the calls of all its openers in the order they reached
#   the bridge.  record=-1 is a ValueError, record="many" a TypeError, both
#   naming "record" (record=0 is not tested: 0 == False).
# - ib.Calls, ib.Call and ib.Fault are in ib.__all__.
# Faults
# - A Fault's byte counts are body bytes as the caller reads them (after a
#   handler's chunked framing is decoded), not bytes on the wire.
# - cut_after: every read style (read(), read(n), readline(), iteration) raises
#   http.client.IncompleteRead; the bytes read before it, with the error's
#   .partial, are exactly the first N.  reset_after: every read style raises
#   ConnectionResetError, after exactly N bytes (read() loses them with the
#   error, as over a socket).  cut_after sets cancelled() for the app while the
#   caller still holds the response.  After a stall_after timeout, the caller's
#   close sets cancelled().
# - chunk_delay leaves the head alone: open() returns and read() times out,
#   for WSGI too (its head travels with the first chunk; only the chunk is late).
#   A lock-step app makes each chunk after the previous one was read, so "each
#   chunk S late" holds whether delays add up or run side by side.
# - times counts every request to the mount that got the fault, the Fault's
#   status answers included, across all openers of a factory; every mount() call
#   starts its own count, so one Fault given to two mounts faults the first K
#   requests of each.
# - mount(..., fault=None) is the same as no fault.  A mount() that fails (a
#   value for fault= that is not an ib.Fault: TypeError naming "fault"; a bad
#   name; None as the app) changes nothing: the app mounted before goes on
#   serving and no fault is left behind.  Fault's arguments are keyword-only.
# - "A Fault on a mount name that does not exist": the pinned API attaches a
#   Fault only through mount(), which creates the name, so there is no such call
#   to make; test_fault_left_nowhere_by_a_mount_that_fails checks the nearest
#   thing (a fault given to a mount that fails leaves nothing behind).
# - A Fault status answer is an HTTPError with an empty body whose reason is
#   http.client.responses[status]; without times= every request gets it.
# - Paths: the wsgi-inline path exists only without a timeout, so the tests of a
#   fault against a caller timeout (delay, chunk_delay, stall_after) run on the
#   three kinds that have one (TIMED_KINDS); every other test runs on all four,
#   except the few that test only the Calls container or argument checks.
#   ib.intercept() (not built yet) is left to the tests of that feature;
#   intercept_http=True stands for an intercepted host here.
#
# The kinds a caller timeout can select (wsgi-inline is WSGI without one).
TIMED_KINDS = tuple(kind for kind in APP_KINDS if KIND_TIMEOUT[kind] is not None)
CAPTURE = 64 * 1024  # what a Call keeps of each body
READ_STYLES = ("read", "read(n)", "readline", "iteration")
# Indexed by "a handler class's chunked body": 3.9's http.client loses the bytes
# of a chunk it could not finish (as over a socket), so a cut there may deliver
# fewer than N bytes -- still never a clean short body.
_CHUNK_PARTIAL_LOST = (False, sys.version_info[:2] == (3, 9))


@contextlib.contextmanager
def _served(kind, logic, fault=None, name="api", **handler_kwargs):
    """(opener, handler, timeout): an opener over a fresh
    InProcHandler(**handler_kwargs) serving make_app(kind, logic) as ``name``
    (with ``fault`` when one is given) and the timeout that selects the kind's
    path; the handler is closed afterwards."""
    with Bridge({}, **handler_kwargs) as bridge:
        app = make_app(kind, logic)
        if fault is None:
            bridge.handler.mount(name, app)
        else:
            bridge.handler.mount(name, app, fault=fault)
        yield bridge.opener, bridge.handler, KIND_TIMEOUT[kind]


def _lines(count):
    """``count`` numbered 10-byte lines."""
    return b"".join(b"line %04d\n" % n for n in range(count))


def _body_logic(body, piece=25, length=True, status=200, seen=None):
    """Logic answering ``status`` with ``body`` in ``piece``-byte chunks (with
    a Content-Length when ``length``); each request is appended to ``seen``."""
    def logic(req):
        if seen is not None:
            seen.append(req)
        headers = [("Content-Type", "text/plain")]
        if length:
            headers.append(("Content-Length", str(len(body))))
        return status, headers, (body[i:i + piece] for i in range(0, len(body), piece))

    return logic


def _endless_logic():
    """(logic, state): an app streaming _lines() until its caller is gone;
    ``state.cancelled`` is its request's ib.cancelled() event, ``state.done``
    is set once the stream has ended."""
    state = types.SimpleNamespace(cancelled=None, done=threading.Event())

    def logic(req):
        state.cancelled = ib.cancelled()

        def lines():
            try:
                for n in range(10000):  # at most 100 kB where nothing holds it back
                    if state.cancelled.is_set():
                        return
                    yield b"line %04d\n" % n
                state.cancelled.wait(WAIT)
            finally:
                state.done.set()

        return 200, [("Content-Type", "text/event-stream")], lines()

    return logic, state


def _pairs(headers):
    """(lower-cased name, value) pairs of ``headers``."""
    return [(name.lower(), value) for name, value in headers]


def _settled(call):
    """``call``'s outcome once it has one ("open" if none came within WAIT)."""
    _wait_for(lambda: call.outcome != "open")
    return call.outcome


def _body_or_code(opener, url, timeout=None):
    """What a GET of ``url`` gave: the body, or the HTTPError's code."""
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code


def _read_to_error(resp, how):
    """Read ``resp`` to its end ``how`` (a READ_STYLES value): (the bytes it
    delivered, counting an error's ``partial``; the error that ended it, or
    None for a clean end)."""
    got = bytearray()
    try:
        if how == "read":
            got += resp.read()
        elif how == "read(n)":
            for data in iter(lambda: resp.read(7), b""):
                got += data
        elif how == "readline":
            for line in iter(resp.readline, b""):
                got += line
        else:
            for line in resp:
                got += line
    except ALLOWED as exc:
        got += getattr(exc, "partial", b"")
        return bytes(got), exc
    return bytes(got), None


# ---------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------


def test_record_and_fault_names_are_public():
    for name in ("Calls", "Call", "Fault"):
        assert isinstance(getattr(ib, name), type)
        assert name in ib.__all__


@pytest.mark.parametrize("body", ["none", "bytes", "file", "iterable"])
def test_record_call_fields(app_kind, body, tmp_path):
    """Every field of a Call, for a GET and for POSTs of bytes, a file and an
    iterable (the last two chunked, as http.client sends them)."""
    payload = b"payload-" * 100
    reply = b'{"ok": true}'
    seen = []

    def logic(req):
        seen.append(req)
        return 201, [("Content-Type", "application/json"), ("X-Reply", "1"),
                     ("Content-Length", str(len(reply)))], [reply[:5], reply[5:]]

    with contextlib.ExitStack() as stack:
        if body == "file":
            path = tmp_path / "body"
            path.write_bytes(payload)
            data = stack.enter_context(path.open("rb"))
        else:
            data = {"none": None, "bytes": payload,
                    "iterable": (payload[i:i + 100] for i in range(0, len(payload), 100))}[body]
        req = urllib.request.Request("inproc://api/v1/chat?x=1", data=data,
                                     headers={"X-Test": "yes"})
        with _served(app_kind, logic, source="billing", actor="user-7",
                     record=True) as (opener, bridge, timeout):
            before = time.time()
            with opener.open(req, timeout=timeout) as resp:
                got, status, reason = resp.read(), resp.status, resp.reason
            after = time.time()
            assert isinstance(bridge.calls, ib.Calls)
            assert len(bridge.calls) == 1
            call = bridge.calls.last
            assert _settled(call) == "complete"
    assert isinstance(call, ib.Call)
    assert call.method == ("GET" if body == "none" else "POST")
    assert call.url == "inproc://api/v1/chat?x=1"
    assert call.mount == "api"
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in call.request_headers)
    recorded = _pairs(call.request_headers)
    assert set(_pairs(seen[0].headers.items())) <= set(recorded)  # as the app received them
    assert ("x-test", "yes") in recorded and ("host", "api") in recorded
    assert call.request_body == seen[0].body == (b"" if body == "none" else payload)
    assert (call.status, call.reason) == (status, reason) == (201, "Created")
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in call.response_headers)
    assert {("content-type", "application/json"), ("x-reply", "1"),
            ("content-length", str(len(reply)))} <= set(_pairs(call.response_headers))
    assert call.response_body == got == reply
    assert (call.source, call.actor) == ("billing", "user-7")
    assert before - 0.01 <= call.started <= after + 0.01
    assert isinstance(call.seconds, float) and 0 <= call.seconds < WAIT


def test_record_capture_keeps_the_first_64_kib(app_kind):
    """Each body is kept up to 64 KiB; the caller and the app still get every byte."""
    sent, answer = SOURCE[:200000], SOURCE[200000:400000]
    seen = []
    with _served(app_kind, _body_logic(answer, piece=50000, seen=seen),
                 record=True) as (opener, bridge, timeout):
        with opener.open("inproc://api/upload", data=sent, timeout=timeout) as resp:
            assert resp.read() == answer
        call = bridge.calls.last
        assert _settled(call) == "complete"
    assert seen[0].body == sent
    assert call.request_body == sent[:CAPTURE]
    assert call.response_body == answer[:CAPTURE]


def test_record_streamed_call_is_open_then_complete(app_kind):
    """A call is there as soon as the request reaches the bridge: "open",
    with no status until the head is out, its head while the body streams,
    then "complete" with its seconds once read to the end."""
    head_go, body_go = threading.Event(), threading.Event()

    def logic(req):
        head_go.wait(WAIT)

        def chunks():
            yield b"one\n"
            body_go.wait(WAIT)
            yield b"two\n"

        return 200, [("Content-Type", "text/event-stream")], chunks()

    with _served(app_kind, logic, record=True) as (opener, bridge, timeout):
        opened = []
        opening = threading.Thread(
            target=lambda: opened.append(opener.open("inproc://api/events", timeout=timeout)),
            name="r-client", daemon=True)
        opening.start()
        try:
            assert _wait_for(lambda: len(bridge.calls) == 1), "no call while the app works"
            call = bridge.calls.last
            assert (call.outcome, call.status, call.seconds) == ("open", None, None)
        finally:
            head_go.set()
        opening.join(WAIT)
        assert opened, "open() did not return"
        with opened[0] as resp:
            assert resp.readline() == b"one\n"
            assert (call.outcome, call.status, call.seconds) == ("open", 200, None)
            assert ("content-type", "text/event-stream") in _pairs(call.response_headers)
            body_go.set()
            assert resp.read() == b"two\n"
        assert _settled(call) == "complete"
        assert bridge.calls.last is call
    assert isinstance(call.seconds, float) and call.seconds >= 0
    assert call.response_body == b"one\ntwo\n"


def test_record_outcome_app_error_before_the_head(app_kind):
    def logic(req):
        raise AppFault("before the head")

    with _served(app_kind, logic, record=True) as (opener, bridge, timeout):
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open("inproc://api/", timeout=timeout)
        with info.value as err:
            assert err.code == 500
            err.read()
        call = bridge.calls.last
        assert _settled(call) == "app-error"
    assert call.status == 500


def test_record_outcome_app_error_after_the_head(app_kind):
    def logic(req):
        def chunks():
            yield b"first\n"
            raise AppFault("after the head")

        return 200, [("Content-Type", "text/plain")], chunks()

    with _served(app_kind, logic, record=True) as (opener, bridge, timeout):
        with opener.open("inproc://api/", timeout=timeout) as resp:
            assert resp.readline() == b"first\n"
            with pytest.raises(ALLOWED):
                resp.read()
        call = bridge.calls.last
        assert _settled(call) == "app-error"
    assert call.status == 200


def test_record_outcome_caller_closed_mid_stream(app_kind):
    logic, state = _endless_logic()
    with _served(app_kind, logic, record=True) as (opener, bridge, timeout):
        with opener.open("inproc://api/events", timeout=timeout) as resp:
            for n in range(3):
                assert resp.readline() == b"line %04d\n" % n
        assert state.done.wait(WAIT), "the app's stream did not end"
        assert _settled(bridge.calls.last) == "caller-closed"


@pytest.mark.parametrize("app_kind", TIMED_KINDS)
def test_record_outcome_timeout(app_kind):
    release, done = threading.Event(), threading.Event()

    def logic(req):
        release.wait(WAIT)
        done.set()
        return 200, [("Content-Type", "text/plain")], [b"late"]

    with _served(app_kind, logic, record=True) as (opener, bridge, _):
        try:
            with pytest.raises(socket.timeout):
                opener.open("inproc://api/slow", timeout=0.2)
            call = bridge.calls.last
            assert _settled(call) == "timeout"
            assert call.status is None
            assert 0.1 <= call.seconds < WAIT
        finally:
            release.set()
        assert done.wait(WAIT)
    assert call.outcome == "timeout"  # the app's late answer changes nothing


def test_record_redirect_is_two_calls(app_kind):
    def logic(req):
        if req.target == "/old":
            return 302, [("Content-Type", "text/plain"), ("Location", "/new?y=2"),
                         ("Content-Length", "0")], []
        return 200, [("Content-Type", "text/plain"), ("Content-Length", "3")], [b"new"]

    with _served(app_kind, logic, record=True) as (opener, bridge, timeout):
        with opener.open("inproc://api/old", data=b"form=1", timeout=timeout) as resp:
            assert resp.read() == b"new"
        assert len(bridge.calls) == 2
        first, second = bridge.calls
        assert [_settled(first), _settled(second)] == ["complete", "complete"]
    assert (first.method, first.url, first.status) == ("POST", "inproc://api/old", 302)
    assert first.request_body == b"form=1"
    assert ("location", "/new?y=2") in _pairs(first.response_headers)
    assert (second.method, second.url, second.status) == ("GET", "inproc://api/new?y=2", 200)
    assert (second.request_body, second.response_body) == (b"", b"new")


def test_record_httperror_response(app_kind):
    with _served(app_kind, _body_logic(b"nope", status=404),
                 record=True) as (opener, bridge, timeout):
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open("inproc://api/missing", timeout=timeout)
        with info.value as err:
            assert err.read() == b"nope"
        call = bridge.calls.last
        assert _settled(call) == "complete"
    assert (call.status, call.reason) == (404, err.reason)
    assert call.response_body == b"nope"


def test_record_head_answer_with_a_content_length_is_complete(app_kind):
    """A HEAD answer declares the length of a body it never has: read and closed,
    the call is "complete" on every path, also while the app still runs."""
    closed = threading.Event()

    def logic(req):
        def chunks():
            yield b"hello"
            closed.wait(WAIT)  # still running once its caller has all a HEAD answer has

        return 200, [("Content-Type", "text/plain"), ("Content-Length", "5")], chunks()

    with _served(app_kind, logic, record=True) as (opener, bridge, timeout):
        try:
            req = urllib.request.Request("inproc://api/", method="HEAD")
            with opener.open(req, timeout=timeout) as resp:
                assert (resp.getheader("Content-Length"), resp.read()) == ("5", b"")
            assert _settled(bridge.calls.last) == "complete"
        finally:
            closed.set()


def test_record_factory_collects_every_openers_calls(app_kind):
    """factory.calls holds the calls of all its openers, each with the source
    and actor its opener_for() gave."""
    with ib.OpenerFactory({"api": make_app(app_kind, _body_logic(b"ok"))}, record=True) as factory:
        agents = factory.opener_for(actor="user-7", source=ib.SOURCE_AGENTS)
        other, plain = factory.opener_for(actor="user-8"), factory.opener_for()
        for n, opener in enumerate((agents, other, plain, agents)):
            assert _body_or_code(opener, "inproc://api/%d" % n, KIND_TIMEOUT[app_kind]) == b"ok"
        calls = list(factory.calls)
        assert [_settled(call) for call in calls] == ["complete"] * 4
    assert [(c.url, c.source, c.actor) for c in calls] == [
        ("inproc://api/0", "agents", "user-7"), ("inproc://api/1", None, "user-8"),
        ("inproc://api/2", None, None), ("inproc://api/3", "agents", "user-7")]
    assert all(c.mount == "api" for c in calls)


def test_record_intercepted_host(app_kind):
    with _served(app_kind, _body_logic(b"ok"), name="api.internal", intercept_http=True,
                 record=True) as (opener, bridge, timeout):
        assert _body_or_code(opener, "http://api.internal/v1?x=1", timeout) == b"ok"
        call = bridge.calls.last
        assert _settled(call) == "complete"
    assert (call.url, call.mount) == ("http://api.internal/v1?x=1", "api.internal")


def test_record_limit_drops_the_oldest(app_kind):
    with _served(app_kind, _body_logic(b"ok"), record=3) as (opener, bridge, timeout):
        for n in range(5):
            assert _body_or_code(opener, "inproc://api/%d" % n, timeout) == b"ok"
        calls = bridge.calls
        assert len(calls) == 3
        assert [call.url for call in calls] == ["inproc://api/%d" % n for n in (2, 3, 4)]
        assert calls[0].url == "inproc://api/2"
        assert calls[-1] is calls.last and calls.last.url == "inproc://api/4"
        with pytest.raises(IndexError):
            calls[3]


def test_record_true_keeps_the_last_thousand():
    with _served("wsgi-inline", _body_logic(b"ok"), record=True) as (opener, bridge, _):
        for n in range(1001):
            with opener.open("inproc://api/%d" % n) as resp:
                resp.read()
        calls = bridge.calls
        assert len(calls) == 1000
        assert (calls[0].url, calls.last.url) == ("inproc://api/1", "inproc://api/1000")


def test_record_clear_and_an_empty_record():
    with _served("wsgi-inline", _body_logic(b"ok"), record=True) as (opener, bridge, _):
        calls = bridge.calls
        assert (len(calls), calls.last, list(calls)) == (0, None, [])
        for n in range(2):
            assert _body_or_code(opener, "inproc://api/%d" % n) == b"ok"
        assert [call.url for call in calls] == ["inproc://api/0", "inproc://api/1"]
        calls.clear()
        assert (len(calls), calls.last, list(calls)) == (0, None, [])
        assert _body_or_code(opener, "inproc://api/after") == b"ok"
        assert [call.url for call in calls] == ["inproc://api/after"]


@pytest.mark.parametrize("value, error", [(-1, ValueError), ("many", TypeError)])
def test_record_bad_limit_is_refused(value, error):
    ib.InProcHandler(record=2).close()  # a good one is taken
    with pytest.raises(error, match=r"\brecord\b"):
        ib.InProcHandler(record=value)
    with pytest.raises(error, match=r"\brecord\b"):
        ib.OpenerFactory(record=value)


def test_record_keeps_every_call_of_eight_threads(app_kind):
    """8 threads x 50 requests: 400 calls, none lost or mixed up, each
    thread's in its order, while another thread reads the record."""
    def logic(req):
        body = req.target.encode()
        return 200, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))], [body]

    with _served(app_kind, logic, record=True) as (opener, bridge, timeout):
        calls = bridge.calls

        def client(t):
            for n in range(50):
                assert _body_or_code(opener, "inproc://api/t%d/%d" % (t, n), timeout) == (
                    b"/t%d/%d" % (t, n))

        def watch():
            deadline = time.monotonic() + WAIT
            while len(calls) < 400 and time.monotonic() < deadline:
                snapshot = list(calls)
                assert len(snapshot) <= 400 and (calls.last is not None or not snapshot)
                threading.Event().wait(0.002)

        _run_threads([*(lambda t=t: client(t) for t in range(8)), watch])
        assert len(calls) == 400
        assert all(_settled(call) == "complete" for call in calls)
        for t in range(8):
            mine = [c for c in calls if c.url.startswith("inproc://api/t%d/" % t)]
            assert [c.url for c in mine] == ["inproc://api/t%d/%d" % (t, n) for n in range(50)]
            assert [c.response_body for c in mine] == [b"/t%d/%d" % (t, n) for n in range(50)]


def test_record_changes_nothing_the_caller_or_the_app_sees(app_kind):
    """The same exchanges on a recorded and an unrecorded bridge: the caller
    gets the same status, headers (but Date) and body, the app the same request."""
    def exchanges(**handler_kwargs):
        app_saw, caller_saw = [], []

        def logic(req):
            app_saw.append((req.method, req.target, sorted(_pairs(req.headers.items())), req.body))
            if req.target == "/missing":
                return 404, [("Content-Type", "text/plain"), ("Content-Length", "4")], [b"gone"]
            return 200, [("Content-Type", "text/plain"), ("X-Got", str(len(req.body)))], [
                b"echo:", req.body, b"|end"]

        with _served(app_kind, logic, **handler_kwargs) as (opener, _, timeout):
            for url, data in (("inproc://api/a?q=1", None), ("inproc://api/b", b"bytes body"),
                              ("inproc://api/c", iter([b"it", b"er", b"able"])),
                              ("inproc://api/missing", None)):
                with _open_any(opener, url, timeout, data) as resp:
                    caller_saw.append((resp.getcode(), resp.reason, [
                        (n, v) for n, v in resp.headers.items() if n.lower() != "date"],
                        resp.read()))
        return caller_saw, app_saw

    plain = exchanges()
    assert exchanges(record=True) == plain
    assert [seen[0] for seen in plain[0]] == [200, 200, 200, 404]


def test_record_and_fault_change_nothing_for_a_length_int_cannot_read(app_kind):
    # "\u00b2" is a digit to str.isdigit(), not to int() -- nor to http.client,
    # which reads such a body to its end: following the head for the
    # journal or a Fault must not trip on it where the caller would not.
    logic = _answer(headers=[("Content-Type", "text/plain"), ("Content-Length", "\u00b2")],
                    body=b"ok")

    def outcome(**kwargs):
        with _served(app_kind, logic, **kwargs) as (opener, _, timeout):
            return _outcome(opener, "inproc://api/", timeout)

    plain = outcome()
    assert outcome(record=True) == plain
    assert outcome(fault=ib.Fault(chunk_delay=0.0)) == plain


@pytest.mark.parametrize("size", [b"zz", b"-2", b"\xb2"],
                         ids=["not-hex", "negative", "superscript"])
def test_record_and_fault_change_nothing_for_a_chunk_size_http_client_refuses(size):
    # Following a handler class's chunked body for the journal or a Fault must
    # not fail on a size line http.client itself refuses (it raises from the
    # read): the caller gets that same error, promptly -- it waited out its
    # timeout for a head, and without one for ever.
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\nok\r\n0\r\n\r\n" % size

    def outcome(**kwargs):
        with Bridge({}, record=kwargs.get("record", False)) as (opener, bridge):
            bridge.mount("api", _raw_handler(None, raw), fault=kwargs.get("fault"))
            return _call(lambda: _outcome(opener, "inproc://api/", timeout=WAIT))

    plain = outcome()
    assert plain[0] == "raises"
    assert outcome(record=True) == plain
    assert outcome(fault=ib.Fault(chunk_delay=0.0)) == plain


def test_record_and_fault_take_a_handlers_103_as_http_client_takes_it():
    # http.client skips 100 Continue and no other 1xx: a 103 it reads as the
    # (bodiless) answer.  The journal records that head, and a Fault that cuts
    # the body leaves it whole, instead of following the 200 written after it.
    def early_hints(handler):
        handler.send_response_only(103)
        handler.send_header("Link", "</style.css>; rel=preload")
        handler.end_headers()
        _respond(handler, 200, b"after the hints")

    handler = _handler(do_GET=early_hints, protocol_version="HTTP/1.1")
    with _loopback(handler) as base:
        want = _observe(_net_opener(), base + "/")
    assert want[:2] == ("HTTPError", 103)
    for fault in (None, ib.Fault(cut_after=3)):
        with Bridge({}, record=True) as (opener, bridge):
            bridge.mount("api", handler, fault=fault)
            assert _observe(opener, "inproc://api/") == want
            call = bridge.calls.last
            assert (call.status, call.response_body, call.outcome) == (103, b"", "complete")


# ---------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_fault_status_answers_without_calling_the_app(app_kind, status):
    seen = []
    with _served(app_kind, _body_logic(b"app", seen=seen),
                 fault=ib.Fault(status=status)) as (opener, _, timeout):
        for _ in range(2):  # without times=, every request
            with pytest.raises(urllib.error.HTTPError) as info:
                opener.open("inproc://api/", timeout=timeout)
            with info.value as err:
                assert err.code == status
                assert err.reason == http.client.responses[status]
                assert err.read() == b""
    assert seen == []


def test_fault_status_with_a_delay_is_a_slow_refusal(app_kind):
    """Fault(status=503, delay=S): the 503 comes S seconds late, and a shorter
    timeout raises socket.timeout from open() (journaled "timeout"), as for an
    app's delayed head; the app is never called."""
    seen = []
    with _served(app_kind, _body_logic(b"app", seen=seen), fault=ib.Fault(status=503, delay=0.2),
                 record=True) as (opener, bridge, _):
        start = time.monotonic()
        with _http_error(503):
            opener.open("inproc://api/", timeout=WAIT)
        assert time.monotonic() - start >= 0.2
        with pytest.raises(socket.timeout):
            opener.open("inproc://api/", timeout=0.05)
        assert [(_settled(call), call.status) for call in bridge.calls] == [
            ("refused", 503), ("timeout", None)]
    assert seen == []


def test_fault_times_with_a_retry_loop(app_kind):
    """Fault(status=503, times=2): a caller that retries gets two 503s, then
    the app; later requests reach the app untouched.  Recorded as refused."""
    seen = []
    with _served(app_kind, _body_logic(b"app", seen=seen), fault=ib.Fault(status=503, times=2),
                 record=True) as (opener, bridge, timeout):
        answers = []
        for _ in range(5):
            answers.append(_body_or_code(opener, "inproc://api/retry", timeout))
            if answers[-1] != 503:
                break
        assert answers == [503, 503, b"app"]
        assert len(seen) == 1
        assert _body_or_code(opener, "inproc://api/retry", timeout) == b"app"
        assert len(seen) == 2
        assert [_settled(call) for call in bridge.calls] == [
            "refused", "refused", "complete", "complete"]
        assert [call.status for call in bridge.calls] == [503, 503, 200, 200]


def test_fault_times_on_a_stream_fault(app_kind):
    body = _lines(10)
    with _served(app_kind, _body_logic(body),
                 fault=ib.Fault(cut_after=15, times=1)) as (opener, _, timeout):
        with opener.open("inproc://api/", timeout=timeout) as resp:
            with pytest.raises(http.client.IncompleteRead):
                resp.read()
        for _ in range(2):
            assert _body_or_code(opener, "inproc://api/", timeout) == body


def test_fault_times_counts_per_mount():
    """One Fault object given to several mounts: each mount counts its own."""
    fault = ib.Fault(status=503, times=1)
    app = make_app("wsgi-inline", _body_logic(b"app"))
    with Bridge({}) as (opener, bridge):
        bridge.mount("a", app, fault=fault)
        bridge.mount("b", app, fault=fault)
        for name in ("a", "b"):
            assert _body_or_code(opener, "inproc://%s/" % name) == 503
            assert _body_or_code(opener, "inproc://%s/" % name) == b"app"
        bridge.mount("a", app, fault=fault)  # a new mount, a new count
        assert _body_or_code(opener, "inproc://a/") == 503
        assert _body_or_code(opener, "inproc://b/") == b"app"


def test_fault_delay_shorter_than_the_timeout_holds_the_head(app_kind):
    body = _lines(3)
    with _served(app_kind, _body_logic(body), fault=ib.Fault(delay=0.3)) as (opener, _, timeout):
        started = time.monotonic()
        with opener.open("inproc://api/", timeout=timeout) as resp:
            held = time.monotonic() - started
            assert resp.read() == body
    assert held >= 0.25


@pytest.mark.parametrize("app_kind", TIMED_KINDS)
def test_fault_delay_longer_than_the_timeout_raises_socket_timeout(app_kind):
    """The head held past the caller's timeout: socket.timeout from open(),
    as from a slow server, and the app is told (cancelled())."""
    told, done = {}, threading.Event()

    def logic(req):
        cancelled = ib.cancelled()

        def chunks():
            try:
                yield b"first\n"
            finally:
                told["cancelled"] = cancelled.wait(WAIT)
                done.set()

        return 200, [("Content-Type", "text/plain")], chunks()

    with _served(app_kind, logic, fault=ib.Fault(delay=1.0)) as (opener, _, _timeout):
        started = time.monotonic()
        with pytest.raises(socket.timeout) as info:
            opener.open("inproc://api/", timeout=0.2)
        assert not isinstance(info.value, urllib.error.URLError)
        assert 0.15 <= time.monotonic() - started < WAIT
        assert done.wait(WAIT), "the app's stream did not end"
    assert told["cancelled"] is True


def test_fault_chunk_delay_holds_each_chunk(app_kind):
    go = threading.Semaphore(0)

    def logic(req):
        def chunks():
            yield b"one\n"
            if go.acquire(timeout=WAIT):
                yield b"two\n"

        return 200, [("Content-Type", "text/plain")], chunks()

    with _served(app_kind, logic, fault=ib.Fault(chunk_delay=0.3)) as (opener, _, timeout):
        started = time.monotonic()
        with opener.open("inproc://api/", timeout=timeout) as resp:
            assert resp.readline() == b"one\n"
            first = time.monotonic() - started
            started = time.monotonic()
            go.release()  # the app makes the second chunk only now
            assert resp.readline() == b"two\n"
            second = time.monotonic() - started
            assert resp.read() == b""
    assert first >= 0.25 and second >= 0.25


@pytest.mark.parametrize("app_kind", TIMED_KINDS)
def test_fault_chunk_delay_longer_than_the_timeout_raises_from_read(app_kind):
    with _served(app_kind, _body_logic(_lines(3), length=False),
                 fault=ib.Fault(chunk_delay=1.0)) as (opener, _, _timeout):
        with opener.open("inproc://api/", timeout=0.2) as resp:
            assert resp.status == 200
            with pytest.raises(socket.timeout):
                resp.read()


@pytest.mark.parametrize("how", READ_STYLES)
@pytest.mark.parametrize("fault, count, length", [
    pytest.param("cut_after", 30, False, id="cut-30-streamed"),
    pytest.param("cut_after", 30, True, id="cut-30-content-length"),
    pytest.param("cut_after", 0, False, id="cut-0-streamed"),
    pytest.param("reset_after", 30, False, id="reset-30-streamed"),
])
def test_fault_cut_and_reset_never_give_a_clean_short_body(app_kind, fault, count, length, how):
    """The body breaks off after exactly ``count`` bytes (mid-chunk: the app
    sends 25-byte chunks) with IncompleteRead (cut) or ConnectionResetError
    (reset), whichever way the caller reads."""
    body = _lines(10)
    error = http.client.IncompleteRead if fault == "cut_after" else ConnectionResetError
    with _served(app_kind, _body_logic(body, length=length),
                 fault=ib.Fault(**{fault: count})) as (opener, _, timeout):
        with opener.open("inproc://api/", timeout=timeout) as resp:
            assert resp.status == 200
            got, exc = _read_to_error(resp, how)
    assert exc is not None, "a clean short body: %d bytes of %d" % (len(got), len(body))
    assert isinstance(exc, error), repr(exc)
    if fault == "cut_after" and not _CHUNK_PARTIAL_LOST[app_kind == "handler" and not length]:
        assert got == body[:count]
    else:
        # A reset, as over a socket, may take with it bytes that were sent but
        # not yet read (a read straddling the reset loses them): never more.
        assert body[:count].startswith(got)


def test_fault_cut_after_tells_the_app_its_caller_is_gone(app_kind):
    logic, state = _endless_logic()
    with _served(app_kind, logic, fault=ib.Fault(cut_after=25)) as (opener, _, timeout):
        with opener.open("inproc://api/events", timeout=timeout) as resp:
            got, exc = _read_to_error(resp, "read(n)")
            assert isinstance(exc, http.client.IncompleteRead), repr(exc)
            if _CHUNK_PARTIAL_LOST[app_kind == "handler"]:
                assert _lines(3)[:25].startswith(got)
            else:
                assert got == _lines(3)[:25]
            assert state.cancelled.wait(WAIT), "the app was not told its caller is gone"
        assert state.done.wait(WAIT), "the app's stream did not end"


@pytest.mark.parametrize("app_kind", TIMED_KINDS)
def test_fault_stall_after_with_a_timeout_raises_socket_timeout(app_kind):
    logic, state = _endless_logic()
    with _served(app_kind, logic, fault=ib.Fault(stall_after=20)) as (opener, _, _timeout):
        with opener.open("inproc://api/events", timeout=0.2) as resp:
            assert resp.readline() == b"line 0000\n"
            assert resp.readline() == b"line 0001\n"
            started = time.monotonic()
            with pytest.raises(socket.timeout):
                resp.readline()
            assert time.monotonic() - started >= 0.15
        assert state.cancelled.wait(WAIT), "the app was not told its caller is gone"
        assert state.done.wait(WAIT), "the app's stream did not end"


@pytest.mark.parametrize("fault, outcome", [
    ({"status": 503}, "refused"), ({"cut_after": 15}, "cut"), ({"reset_after": 15}, "cut")])
def test_fault_with_record_gives_the_outcome(app_kind, fault, outcome):
    with _served(app_kind, _body_logic(_lines(5)), fault=ib.Fault(**fault),
                 record=True) as (opener, bridge, timeout):
        if "status" in fault:
            assert _body_or_code(opener, "inproc://api/", timeout) == 503
        else:
            with opener.open("inproc://api/", timeout=timeout) as resp, pytest.raises(ALLOWED):
                resp.read()
        call = bridge.calls.last
        assert _settled(call) == outcome
    if "status" in fault:
        assert (call.status, call.response_body) == (503, b"")
    else:
        assert call.status == 200


@pytest.mark.parametrize("fault", ["cut_after", "reset_after"])
def test_fault_on_the_body_leaves_a_head_answer_alone(app_kind, fault):
    """A HEAD answer has no body for a cut or reset to act on (the app's body,
    which a server drops, does not count): read() is b"", the call "complete",
    its response_body empty."""
    with _served(app_kind, _body_logic(_lines(5)), fault=ib.Fault(**{fault: 15}),
                 record=True) as (opener, bridge, timeout):
        req = urllib.request.Request("inproc://api/", method="HEAD")
        with opener.open(req, timeout=timeout) as resp:
            assert (resp.status, resp.read()) == (200, b"")
        call = bridge.calls.last
        assert _settled(call) == "complete"
    assert call.response_body == b""


def test_fault_remount_without_fault_clears_it(app_kind):
    app = make_app(app_kind, _body_logic(b"app"))
    timeout = KIND_TIMEOUT[app_kind]
    with Bridge({}) as (opener, bridge):
        for fault in ({}, {"fault": None}):
            bridge.mount("api", app, fault=ib.Fault(status=503))
            assert _body_or_code(opener, "inproc://api/", timeout) == 503
            bridge.mount("api", app, **fault)
            assert _body_or_code(opener, "inproc://api/", timeout) == b"app"
        bridge.mount("api", app, fault=ib.Fault(status=503))
        bridge.unmount("api")
        bridge.mount("api", app)
        assert _body_or_code(opener, "inproc://api/", timeout) == b"app"


def test_fault_factory_mount_takes_fault(app_kind):
    """OpenerFactory.mount(fault=): times counts the requests of all its openers."""
    app = make_app(app_kind, _body_logic(b"app"))
    timeout = KIND_TIMEOUT[app_kind]
    with ib.OpenerFactory(record=True) as factory:
        factory.mount("api", app, fault=ib.Fault(status=503, times=1))
        first, second = factory.opener_for(actor="a"), factory.opener_for(actor="b")
        assert _body_or_code(first, "inproc://api/", timeout) == 503
        assert _body_or_code(second, "inproc://api/", timeout) == b"app"
        assert _body_or_code(first, "inproc://api/", timeout) == b"app"
        assert [(call.actor, _settled(call)) for call in factory.calls] == [
            ("a", "refused"), ("b", "complete"), ("a", "complete")]
        factory.mount("api", app, fault=ib.Fault(status=503))
        assert _body_or_code(second, "inproc://api/", timeout) == 503
        factory.mount("api", app)
        assert _body_or_code(second, "inproc://api/", timeout) == b"app"


def test_fault_applies_to_an_intercepted_host(app_kind):
    with _served(app_kind, _body_logic(b"app"), fault=ib.Fault(status=503, times=1),
                 name="api.internal", intercept_http=True) as (opener, _, timeout):
        assert _body_or_code(opener, "http://api.internal/v1", timeout) == 503
        assert _body_or_code(opener, "https://api.internal/v1", timeout) == b"app"


@pytest.mark.parametrize("name, value", [
    ("delay", -0.1), ("chunk_delay", -1.0), ("cut_after", -1), ("reset_after", -1),
    ("stall_after", -1), ("times", 0), ("times", -2)])
def test_fault_bad_values_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=r"\b%s\b" % name):
        ib.Fault(**{name: value})


def test_fault_unknown_keyword_and_positional_arguments_are_typeerror():
    with pytest.raises(TypeError, match="stauts"):
        ib.Fault(stauts=503)
    with pytest.raises(TypeError):
        ib.Fault(503)


@pytest.mark.parametrize("value", [{"status": 503}, 503])
def test_fault_mount_refuses_what_is_not_a_fault(value):
    app = make_app("wsgi-inline", _body_logic(b"app"))
    with Bridge({"api": app}) as (opener, bridge):
        bridge.mount("api", app, fault=None)  # None is taken: no fault
        with pytest.raises(TypeError, match=r"\bfault\b"):
            bridge.mount("api", app, fault=value)
        assert _body_or_code(opener, "inproc://api/") == b"app"  # the old mount stays
    with ib.OpenerFactory({"api": app}) as factory:
        factory.mount("api", app, fault=None)
        with pytest.raises(TypeError, match=r"\bfault\b"):
            factory.mount("api", app, fault=value)
        assert _body_or_code(factory.opener_for(), "inproc://api/") == b"app"


def test_fault_left_nowhere_by_a_mount_that_fails():
    fault = ib.Fault(status=503)
    app = make_app("wsgi-inline", _body_logic(b"app"))
    with Bridge({}) as (opener, bridge):
        with pytest.raises(ValueError, match="cannot mount"):
            bridge.mount("no such/name", app, fault=fault)
        with pytest.raises(TypeError):
            bridge.mount("api", None, fault=fault)
        with pytest.raises(urllib.error.URLError, match="'api'"):
            opener.open("inproc://api/")
        bridge.mount("api", app)
        assert _body_or_code(opener, "inproc://api/") == b"app"


# ---------------------------------------------------------------------------
# Drain and context managers
# ---------------------------------------------------------------------------
# Where the SPEC is silent, these tests take what a user would expect:
# Drain
# - An exchange is "in flight" from the request reaching the bridge until its caller has
#   read the body to the end or closed the response: a caller that has the head but has
#   not finished reading counts, and is cancelled (and counted) if it is still reading at
#   the deadline.  A request refused with 503 is never counted.
# - drain(timeout) returns as soon as nothing is in flight (not at the deadline); its value
#   is the number of exchanges it cancelled at the deadline.
# - The refusal is "503 Service Unavailable" (HTTPError, reason as http.client.responses).
# - After drain, mount() of a handler class, a WSGI app or a URL is still accepted, and
#   requests to it get 503; an ASGI app may instead be refused with BridgeError, as after
#   close().  A drained factory's opener_for() still hands out openers (their requests get
#   503).  drain() again returns 0 at once.
# - An ASGI app whose exchange is cancelled sees http.disconnect from receive() (before the
#   loop's shutdown may cancel its task); a sync app sees cancelled() set.
# - `with` returns the object itself, calls close() on the way out, normally or by an
#   exception, and never swallows the exception.
# Remote mounts
# - The caller sees the URL it opened: geturl() (and HTTPError.filename) is the inproc://
#   URL, not the remote one.  A caller timeout raises socket.timeout itself (as urllib does
#   for a server that accepted the connection), not a URLError around it.
# - The remote URL's path is a prefix: "http://host/base" + "/v1/chat?x=1" is
#   "/base/v1/chat?x=1" on the wire (and "/" gives "/base/"); percent-escapes in the path
#   travel as the caller wrote them and still verify.
# - Bad input errors: a URL that is not http(s) -> ValueError naming its scheme; a key that
#   is not bytes -> TypeError saying "bytes"; max_age <= 0 -> ValueError naming max_age.
#   All at mount/wrap time, also for URLs given in an `apps` mapping.
# trusted()
# - The signed bytes are not tested: every attack alters what the server receives (a
#   proxy-like WSGI middleware in front of trusted(), or a request replayed from a
#   captured good one) and expects 401 with the app not called.
# - Inproc-Time: no format is assumed beyond "has a decimal digit" (the tampering test
#   changes its last digit: a shift of a few units of its last place, well inside
#   max_age).  trusted() reads the wall clock with time.time() (or time.time_ns()) at
#   request time, so a test can age a signature by moving that clock.
# - A replay inside max_age is accepted (the SPEC asks for no nonce); outside it is 401.
# - A source or actor of None sends no header and is signed as absent: adding the header
#   on the way makes the request 401.  The remote app sees None, not "None" or "".
# - Remotely the app sees current_source() as an ib.Source and current_actor() as
#   str(actor); served in-process a trusted app sees the actor object itself.
# - The 401 body is not pinned, except that it never carries the key.
# - trusted() compares signatures with hmac.compare_digest, looked up in the hmac module
#   at request time, for good and bad signatures alike (no early == on a mismatch).
# - Served in-process, a trusted app is the app: the bridge's source/actor, no 401; caller-
#   set Inproc-* headers do not change current_source()/current_actor() there either.
#
# Each drain test runs on the four paths.  "ping" routes answer at once; an "endless"
# app sends FIRST and then never ends on its own.  A drain running in another thread is
# known to have begun once a ping gets 503 (a bounded poll, no sleep).

#: Seconds a drain gives an endless stream before it cancels it.
DRAIN_DEADLINE = 0.5
#: A deadline that in-flight exchanges are expected to beat by far.
DRAIN_GENEROUS = WAIT / 2
#: What an endless sync app writes after FIRST (big chunks: the pipe fills in a few).
_TICK = b"t" * 65535 + b"\n"


def _ok(calls):
    """make_app() logic answering "ok" at once; the targets it served go to ``calls``."""

    def logic(req):
        calls.append(req.target)
        return 200, [("Content-Type", "text/plain"), ("Content-Length", "2")], [b"ok"]

    return logic


def _endless_app(kind, seen):
    """An app of ``kind`` that sends FIRST and does not end on its own within a test (a
    sync one fills the pipe, then waits WAIT; an ASGI one waits WAIT for http.disconnect:
    a drain that fails to cancel it fails the test, it does not hang it).  When it ends,
    ``seen`` gets what it saw: cancelled().is_set() (sync kinds; the event is taken in the
    request's context, its close may run elsewhere) or "http.disconnect" / "cancelled" /
    "never told" (ASGI: what receive() said, the task was cancelled first, or neither)."""
    if kind == "asgi":

        async def endless(scope, receive, send):
            if scope["type"] != "http":
                raise ValueError("http only")
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": FIRST, "more_body": True})
            try:
                while (await asyncio.wait_for(receive(), WAIT))["type"] != "http.disconnect":
                    pass
                seen.append("http.disconnect")
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            except asyncio.TimeoutError:
                seen.append("never told")

        return endless

    def logic(req):
        def chunks():
            event = ib.cancelled()
            try:
                yield FIRST
                for _ in range(64):  # 4 MiB: more than the pipe holds
                    yield _TICK
                event.wait(WAIT)
            finally:
                seen.append(event.is_set())

        return 200, [("Content-Type", "text/plain")], chunks()

    return make_app(kind, logic)


def _left(kind):
    """What _endless_app() records when its exchange is cancelled or its caller left."""
    return "http.disconnect" if kind == "asgi" else True


def _refusing(opener, url, timeout):
    """True if ``url`` now gets 503 (a drain has begun); False if it is served."""
    try:
        with opener.open(url, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code == 503
    return False


def _where(record):
    """An ASGI app that records the thread it runs on (the bridge's loop thread)."""

    async def where(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        record["thread"] = threading.current_thread()
        await _receive_messages(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"here"})

    return where


class _Leave(Exception):
    """Raised inside a with block to leave it by an exception."""


def test_drain_refuses_new_requests_with_503_and_the_app_is_not_called(app_kind):
    calls = []
    with Bridge({"app": make_app(app_kind, _ok(calls))}) as (opener, handler):
        assert handler.drain(WAIT) == 0
        with _http_error(503) as info:
            opener.open("inproc://app/v1/chat?x=1", timeout=KIND_TIMEOUT[app_kind])
        assert info.value.reason == "Service Unavailable"
        with _http_error(503):
            opener.open("inproc://app/", data=b"a body", timeout=KIND_TIMEOUT[app_kind])
    assert calls == []


def test_drain_with_nothing_in_flight_returns_at_once(app_kind):
    calls = []
    with Bridge({"app": make_app(app_kind, _ok(calls))}) as (opener, handler):
        with opener.open("inproc://app/", timeout=KIND_TIMEOUT[app_kind]) as resp:
            assert resp.read() == b"ok"  # read to the end: finished, not in flight
        started = time.monotonic()
        assert handler.drain(WAIT) == 0
        assert time.monotonic() - started < WAIT / 2
    assert calls == ["/"]


def _drain_beside(handler, opener, ping, timeout, then):
    """(count, seconds) of handler.drain(DRAIN_GENEROUS) run in one thread while
    another, once a request to ``ping`` is refused (drain has begun), runs
    ``then``; both bounded by WAIT."""
    drained, over = [], threading.Event()

    def drain():
        try:
            started = time.monotonic()
            drained.append(handler.drain(DRAIN_GENEROUS))
            drained.append(time.monotonic() - started)
        finally:
            over.set()

    def beside():
        assert _wait_for(lambda: over.is_set() or _refusing(opener, ping, timeout)), (
            "drain() never began refusing")
        then()

    _run_threads([drain, beside], WAIT)
    return tuple(drained)


def test_drain_lets_an_in_flight_stream_that_ends_in_time_complete_intact(app_kind):
    """A drain begun mid-stream: the stream still ends within the deadline, the caller
    reads every byte, and drain() returns 0 as soon as it is done, not at the deadline."""
    timeout = KIND_TIMEOUT[app_kind]
    release, waited = threading.Event(), []

    def logic(req):
        if req.target == "/ping":
            return 200, [("Content-Type", "text/plain"), ("Content-Length", "2")], [b"ok"]
        return 200, [("Content-Type", "text/plain")], _held_stream(release, waited)

    with Bridge({"app": make_app(app_kind, logic)}) as (opener, handler):
        with opener.open("inproc://app/stream", timeout=timeout) as resp:
            assert resp.read(len(FIRST)) == FIRST
            read = {}

            def finish():
                release.set()
                read["rest"] = resp.read()

            count, seconds = _drain_beside(handler, opener, "inproc://app/ping", timeout, finish)
        assert read["rest"] == b"second|third"
    assert count == 0
    assert seconds < DRAIN_GENEROUS - 1.0, "drain() waited for its deadline"
    assert waited == [True]


def test_drain_cancels_endless_streams_at_the_deadline_and_counts_them(app_kind):
    """Two endless streams and one finished exchange: at the deadline (not before) the
    two are cancelled -- their readers raise, their apps see cancelled() set or
    http.disconnect -- and drain() returns 2."""
    timeout = KIND_TIMEOUT[app_kind]
    seen, calls = [], []
    apps = {"endless": _endless_app(app_kind, seen), "ping": make_app(app_kind, _ok(calls))}
    with Bridge(apps) as (opener, handler):
        with opener.open("inproc://ping/", timeout=timeout) as resp:
            assert resp.read() == b"ok"
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(opener.open("inproc://endless/", timeout=timeout))
                       for _ in range(2)]
            for resp in streams:
                assert resp.read(len(FIRST)) == FIRST
            started = time.monotonic()
            assert handler.drain(DRAIN_DEADLINE) == 2
            elapsed = time.monotonic() - started
            for resp in streams:
                with pytest.raises(ALLOWED):
                    resp.read()
        assert _wait_for(lambda: len(seen) >= 2), "the apps never learnt they were cancelled"
    assert DRAIN_DEADLINE - 0.05 <= elapsed < DRAIN_DEADLINE + WAIT
    assert seen == [_left(app_kind)] * 2


def test_drain_cancels_a_request_caught_before_its_app_was_reached(app_kind, monkeypatch):
    """A request drain() cancels in the moment between reaching the bridge and its
    app (here: a drain(0) at that very point): counted, and its caller hears at once
    -- not after its whole timeout (socket.timeout), or never without one."""
    kind = "wsgi" if app_kind in WSGI_KINDS else app_kind
    serve, drained = ib._SERVE[kind], []

    def serve_after_a_drain(bridge, *args):
        drained.append(bridge.drain(0))
        return serve(bridge, *args)

    monkeypatch.setitem(ib._SERVE, kind, serve_after_a_drain)
    timeout = None if KIND_TIMEOUT[app_kind] is None else WAIT  # (a long one: "at once" shows)
    with Bridge({"api": make_app(app_kind, _ok([]))}) as (opener, _):
        started = time.monotonic()
        with pytest.raises((*ALLOWED, urllib.error.URLError)) as info:
            with opener.open("inproc://api/", timeout=timeout) as resp:
                resp.read()
        assert time.monotonic() - started < WAIT / 2
    assert not isinstance(info.value, socket.timeout), repr(info.value)
    assert drained == [1]


def test_drain_cancels_an_answer_its_caller_has_not_read(app_kind):
    """An app that has answered in full, a caller that holds the response unread: in
    flight until the deadline, then cancelled and counted, and the caller's read
    raises -- on every path, whichever buffer the answer's bytes wait in."""
    with Bridge({"api": make_app(app_kind, _ok([]))}) as (opener, handler):
        with opener.open("inproc://api/", timeout=KIND_TIMEOUT[app_kind]) as resp:
            assert handler.drain(DRAIN_DEADLINE) == 1
            with pytest.raises(ALLOWED):
                resp.read()


def test_drain_returns_once_the_caller_closes_its_stream(app_kind):
    """Closing the response ends an exchange as reading it to the end does: the drain
    returns 0 well before its deadline; the app sees its caller leave."""
    timeout = KIND_TIMEOUT[app_kind]
    seen = []
    apps = {"endless": _endless_app(app_kind, seen), "ping": make_app(app_kind, _ok([]))}
    with Bridge(apps) as (opener, handler):
        with contextlib.closing(opener.open("inproc://endless/", timeout=timeout)) as resp:
            assert resp.read(len(FIRST)) == FIRST
            count, seconds = _drain_beside(handler, opener, "inproc://ping/", timeout, resp.close)
        assert _wait_for(lambda: seen), "the app never learnt its caller left"
    assert count == 0
    assert seconds < DRAIN_GENEROUS - 1.0, "drain() waited for its deadline"
    assert seen == [_left(app_kind)]


def test_drain_from_another_thread_while_8_threads_make_requests(app_kind):
    """Eight clients loop on requests; once each has been served, another thread drains.
    Every request is either served whole or refused with 503, every client ends on a 503,
    nothing hangs, and nothing needed cancelling."""
    timeout = KIND_TIMEOUT[app_kind]
    calls = []
    outcomes = {i: [] for i in range(8)}
    served_once = threading.Semaphore(0)
    drained, over = [], threading.Event()
    with Bridge({"app": make_app(app_kind, _ok(calls))}) as (opener, handler):

        def client(i):
            while True:
                after = over.is_set()  # the drain is over: this request must be refused
                try:
                    with opener.open("inproc://app/", timeout=timeout) as resp:
                        body = resp.read()
                except urllib.error.HTTPError as exc:
                    exc.close()
                    outcomes[i].append(exc.code)
                    return
                outcomes[i].append(body)
                if len(outcomes[i]) == 1:
                    served_once.release()
                if after:
                    return

        def drain():
            try:
                for _ in range(8):
                    assert served_once.acquire(timeout=WAIT), "a client was never served"
                drained.append(handler.drain(DRAIN_GENEROUS))
            finally:
                over.set()

        _run_threads([functools.partial(client, i) for i in range(8)] + [drain], WAIT)
    assert drained == [0]
    for i, seen in outcomes.items():
        assert seen[-1] == 503, "client %d was not refused: %r" % (i, seen[-3:])
        assert set(seen[:-1]) == {b"ok"}, "client %d: %r" % (i, seen)
    assert len(calls) == sum(len(seen) - 1 for seen in outcomes.values())


def test_drain_refuses_for_good_mounts_made_later_included(app_kind, remote):
    timeout = KIND_TIMEOUT[app_kind]
    calls, far_calls = [], []
    remote.app = make_app(remote.kind, _ok(far_calls))
    with Bridge({"app": make_app(app_kind, _ok(calls))}) as (opener, handler):
        assert handler.drain(WAIT) == 0
        names = ["app"]
        for name in ("later", "app"):  # a new name, and a remount of the drained one
            handler.mount(name, make_app(app_kind, _ok(calls)))  # every kind, ASGI too
            names.append(name)
        handler.mount("far", remote.url)
        names.append("far")
        for _ in range(2):
            for name in names:
                with _http_error(503):
                    opener.open("inproc://%s/" % name, timeout=timeout)
            started = time.monotonic()
            assert handler.drain(WAIT) == 0  # again: nothing in flight, at once
            assert time.monotonic() - started < WAIT / 2
    assert calls == []
    assert far_calls == []


def test_drain_on_a_factory_refuses_for_good_mounts_made_later_included(app_kind):
    timeout = KIND_TIMEOUT[app_kind]
    calls = []
    factory = ib.OpenerFactory({"app": make_app(app_kind, _ok(calls))})
    try:
        opener = factory.opener_for()
        assert factory.drain(WAIT) == 0
        for name in ("later", "app"):  # a new name, and a remount of the drained one
            factory.mount(name, make_app(app_kind, _ok(calls)))
        for current in (opener, factory.opener_for()):
            for name in ("later", "app"):
                with _http_error(503):
                    current.open("inproc://%s/" % name, timeout=timeout)
    finally:
        factory.close()
    assert calls == []


@pytest.mark.parametrize("owner", ["handler", "factory"])
def test_drain_an_asgi_app_mounted_later_is_never_started_nor_called(owner):
    """After drain() an ASGI app mounts as every kind does: no lifespan
    startup (the app is not called: drain closed the loop), 503 for its
    requests, and a remount or unmount raises nothing."""
    first, later = LifespanApp(), LifespanApp()
    mounts = ib.InProcHandler({"api": first}) if owner == "handler" else ib.OpenerFactory(
        {"api": first})
    opener = (urllib.request.build_opener(mounts) if owner == "handler"
              else mounts.opener_for())
    try:
        assert mounts.drain(WAIT) == 0
        assert first.shutdown.is_set()  # drain() did what close() does
        mounts.mount("later", later)
        mounts.mount("api", later)  # replaces the drained app
        for name in ("later", "api"):
            with _http_error(503):
                opener.open("inproc://%s/" % name, timeout=WAIT)
        mounts.unmount("later")
        mounts.unmount("api")
    finally:
        mounts.close()
    assert later.events == []
    assert first.events == ["lifespan.startup", "lifespan.shutdown"]


def test_drain_on_a_factory_refuses_on_every_opener_and_cancels_what_is_in_flight(app_kind):
    timeout = KIND_TIMEOUT[app_kind]
    seen, calls = [], []
    with ib.OpenerFactory({"endless": _endless_app(app_kind, seen),
                           "ping": make_app(app_kind, _ok(calls))}) as factory:
        one, two = factory.opener_for(source="one"), factory.opener_for(actor="two")
        with one.open("inproc://ping/", timeout=timeout) as resp:
            assert resp.read() == b"ok"
        with two.open("inproc://endless/", timeout=timeout) as resp:
            assert resp.read(len(FIRST)) == FIRST
            assert factory.drain(DRAIN_DEADLINE) == 1
            with pytest.raises(ALLOWED):
                resp.read()
        assert _wait_for(lambda: seen), "the app never learnt it was cancelled"
        for opener in (one, two, factory.opener_for()):
            with _http_error(503):
                opener.open("inproc://ping/", timeout=timeout)
        assert factory.drain(WAIT) == 0
    assert calls == ["/"]
    assert seen == [_left(app_kind)]


@contextlib.contextmanager
def _remote_stream(remote, timeout):
    """(handler, response) of a remote mount streaming FIRST (already read),
    then b"late" only once the test is over."""
    release = threading.Event()
    remote.app = make_app(remote.kind, _first_then_late(release))
    handler = ib.InProcHandler({"far": remote.url})
    try:
        with _bridge_opener(handler).open("inproc://far/", timeout=timeout) as resp:
            assert resp.read(len(FIRST)) == FIRST
            yield handler, resp
    finally:
        release.set()
        handler.close()


def test_drain_cancels_an_endless_remote_stream_at_the_deadline(remote):
    with _remote_stream(remote, WAIT) as (handler, resp):
        assert handler.drain(DRAIN_DEADLINE) == 1
        with pytest.raises(ALLOWED):
            resp.read()


@pytest.mark.parametrize("leave", ["normally", "by an exception"])
@pytest.mark.parametrize("unit", ["handler", "factory"])
def test_drain_handler_or_factory_as_a_context_manager_returns_it_and_closes_it(unit, leave):
    record, lifespan = {}, LifespanApp()
    mounts = {"where": _where(record), "life": lifespan}
    bridge = ib.InProcHandler(mounts) if unit == "handler" else ib.OpenerFactory(mounts)
    if unit == "handler":
        opener = urllib.request.build_opener(bridge)
    raising = pytest.raises(_Leave) if leave == "by an exception" else contextlib.nullcontext()
    with raising, bridge as entered:
        assert entered is bridge
        if unit == "factory":
            opener = entered.opener_for(source="one")
        with opener.open("inproc://where/", timeout=WAIT) as resp:
            assert resp.read() == b"here"
        assert record["thread"].is_alive()
        if leave == "by an exception":
            raise _Leave()
    assert _wait_for(lambda: not record["thread"].is_alive()), "the ASGI loop still runs"
    assert lifespan.shutdown.is_set()
    with pytest.raises(ib.BridgeError):  # closed: ASGI apps can no longer be called
        opener.open("inproc://where/", timeout=WAIT)


# ---------------------------------------------------------------------------
# Remote mounts and trusted
# ---------------------------------------------------------------------------
# The far side is a real server on 127.0.0.1: wsgiref (threaded, in the main suite) or
# uvicorn (optional), serving whatever app the test sets as ``remote.app``.  A raw
# listening socket stands in where the test needs the bytes on the wire or a server that
# accepts and never answers.  Attacks alter what the server received, in a proxy-like
# middleware in front of trusted(), or replay a captured good request to trusted()
# directly: nothing here knows how the signature is laid out.

KEY = b"issue-13 shared secret \xa7\x00"
#: What a caller might set to pass itself off as someone else.
_FORGED = {"Inproc-Source": "admin", "Inproc-Actor": "root", "Inproc-Time": "0",
           "Inproc-Signature": "forged", "Inproc-Extra": "smuggled"}
_OK_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
       b"Connection: close\r\n\r\nok")
#: A caller timeout far shorter than WAIT.
SHORT_TIMEOUT = 0.3
#: The client code that must not change when the app moves out of process.
_GATEWAY_CALLS = [
    ("/v1/chat?x=1", {}),
    ("/v1/chat", {"data": b'{"q": "hi"}',
                  "headers": {"Content-Type": "application/json", "X-Call": "c-1"}}),
    ("/v1/items/7", {"data": b"new", "method": "PUT"}),
    ("/stream?n=2", {}),
    ("/missing", {"headers": {"X-Call": "c-2"}}),
]


class _Remote:
    """A server on loopback; it serves ``app`` (set by the test: WSGI for wsgiref, ASGI
    for uvicorn).  ``kind``: the make_app() kind that builds an app for it."""

    def __init__(self, kind):
        self.kind = kind
        self.url = None
        self.app = None

    def wsgi(self, environ, start_response):
        return self.app(environ, start_response)

    async def asgi(self, scope, receive, send):
        await self.app(scope, receive, send)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    # Daemon request threads: a request a failing test left open cannot keep the server,
    # or the interpreter, from stopping.
    daemon_threads = True


@contextlib.contextmanager
def _wsgiref_remote():
    remote = _Remote("wsgi-worker")
    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, remote.wsgi, server_class=_ThreadingWSGIServer,
        handler_class=_QuietWSGIHandler)
    remote.url = "http://127.0.0.1:%d" % server.server_address[1]
    with _serving(server, name="wsgiref-remote", daemon=True):
        yield remote


@contextlib.contextmanager
def _uvicorn_remote():
    uvicorn = _optional("uvicorn")
    remote = _Remote("asgi")
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(remote.asgi, interface="asgi3", http="h11", lifespan="off",
                            log_level="error", log_config=None, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="uvicorn-remote", daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: server.started or not thread.is_alive()) and server.started, (
            "uvicorn did not start")
        remote.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        yield remote
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def remote():
    """A wsgiref server (threaded) on 127.0.0.1, stopped after the test."""
    with _wsgiref_remote() as server:
        yield server


@pytest.fixture(params=["wsgiref", pytest.param("uvicorn", marks=pytest.mark.optional)])
def any_remote(request):
    """wsgiref serving WSGI, or uvicorn serving ASGI (optional), on 127.0.0.1."""
    serve = _wsgiref_remote if request.param == "wsgiref" else _uvicorn_remote
    with serve() as server:
        yield server


class _RawServer:
    """A listening socket on 127.0.0.1 whose one thread takes connections in turn.  With
    ``answer`` it reads each request (head and Content-Length body), keeps its bytes in
    ``received`` and answers with ``answer``; with None it accepts each connection and
    holds it, never answering, until the server is closed."""

    def __init__(self, answer=None):
        self.answer = answer
        self.received = []
        self.accepted = threading.Event()
        self._stop = threading.Event()
        self._held = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, name="raw-server", daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        with contextlib.suppress(OSError):  # wake accept() up
            socket.create_connection(self.sock.getsockname(), WAIT).close()
        self.thread.join(WAIT)
        self.sock.close()
        for conn in self._held:
            conn.close()
        assert not self.thread.is_alive(), "the raw server thread did not stop"

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            self.accepted.set()
            if self.answer is None:
                self._held.append(conn)
                continue
            with conn:
                conn.settimeout(WAIT)
                try:
                    self.received.append(self._read_request(conn))
                    conn.sendall(self.answer)
                except OSError:
                    pass

    @staticmethod
    def _read_request(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        chunked = re.search(rb"(?im)^transfer-encoding:.*chunked", head)

        def complete():
            if length:
                return len(body) >= int(length.group(1))
            return not chunked or body.endswith(b"0\r\n\r\n")

        while not complete():
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def _request_headers(data):
    """[(lower-case name, value)] of the request head in ``data``, as sent."""
    lines = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    pairs = (line.decode("latin-1").partition(":") for line in lines)
    return [(name.strip().lower(), value.strip()) for name, _, value in pairs]


def _inproc_headers(data):
    return [(name, value) for name, value in _request_headers(data) if name.startswith("inproc-")]


def _bridge_opener(handler):
    """An opener over ``handler`` that sends nothing through environment proxies."""
    return urllib.request.build_opener(handler, urllib.request.ProxyHandler({}))


def _factory_opener(factory, **tags):
    return factory.opener_for(urllib.request.ProxyHandler({}), **tags)


def _gateway(seen):
    """make_app() logic of a small gateway; what each request showed it goes to ``seen``."""

    def logic(req):
        source = ib.current_source()
        seen.append({
            "method": req.method, "target": req.target, "body": req.body,
            "source": source, "source type": type(source).__name__,
            "actor": ib.current_actor(),
            "x-call": req.headers.get("X-Call"),
            # wsgiref makes up a Content-Type (text/plain) for a request without one
            "content-type": req.headers.get("Content-Type") if req.body else None,
            "inproc headers": sorted(name.lower() for name in req.headers
                                     if name.lower().startswith("inproc-")),
        })
        if req.target.startswith("/missing"):
            return 404, [("Content-Type", "text/plain"), ("Content-Length", "9")], [b"not found"]
        if req.target.startswith("/stream"):
            return 200, [("Content-Type", "application/x-ndjson")], [b'{"n": 1}\n', b'{"n": 2}\n']
        body = ("%s %s %d" % (req.method, req.target, len(req.body))).encode()
        return 200, [("Content-Type", "text/plain"), ("X-Many", "one"), ("X-Many", "two"),
                     ("Set-Cookie", "sid=1; Path=/"), ("Content-Length", str(len(body)))], [body]

    return logic


def _tags_recorded(kind, app, seen):
    """``app`` behind a shim that records the tags of each HTTP request to ``seen``:
    environ["inproc.source"/"inproc.actor"] (WSGI), the scope's inproc extension (ASGI)."""
    if kind == "asgi":

        async def asgi(scope, receive, send):
            if scope["type"] == "http":
                tags = scope.get("extensions", {}).get("inproc", {})
                seen.append(("scope", tags.get("source"), tags.get("actor")))
            await app(scope, receive, send)

        return asgi

    def wsgi(environ, start_response):
        seen.append(("environ", environ.get("inproc.source"), environ.get("inproc.actor")))
        return app(environ, start_response)

    return wsgi


def _final_url(opener, url, timeout):
    """geturl() of the response (or the HTTPError) ``url`` gets."""
    with _open_any(opener, url, timeout) as resp:
        resp.read()
        return resp.geturl()


def _gateway_calls(opener, timeout):
    """What the caller sees of _GATEWAY_CALLS (and of two URLs) through ``opener``."""
    views = [_seen(opener, "inproc://api" + path, timeout, **kw) for path, kw in _GATEWAY_CALLS]
    views += [_final_url(opener, "inproc://api" + path, timeout)
              for path in ("/v1/chat?x=1", "/missing")]
    return views


def _as_is(app):
    return app


def _guarded(app):
    return ib.trusted(app, KEY)


def _plain_app(seen):
    """A WSGI app answering "ok"; what each request showed it goes to ``seen``."""

    def app(environ, start_response):
        seen.append({
            "source": ib.current_source(), "actor": ib.current_actor(),
            "environ": (environ.get("inproc.source"), environ.get("inproc.actor")),
            "method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
            "query": environ.get("QUERY_STRING", ""),
            "inproc headers": sorted(k for k in environ if k.startswith("HTTP_INPROC")),
        })
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    return app


def _through(remote, alter=None, *, key=KEY, source=ib.SOURCE_AGENTS, actor="user-7",
             base="", target="/v1/chat?x=1", method="GET", headers=None):
    """One request through a remote mount (``key``) to trusted(_plain_app, KEY) on the
    wsgiref ``remote``; ``alter(environ)`` changes what the server received before
    trusted() sees it, as a proxy in between might.  (status, body, what the app saw)."""
    seen = []
    guarded = ib.trusted(_plain_app(seen), KEY)

    def proxy(environ, start_response):
        if alter is not None:
            alter(environ)
        return guarded(environ, start_response)

    remote.app = proxy
    with ib.InProcHandler(source=source, actor=actor) as handler:
        handler.mount("api", remote.url + base, key=key)
        req = urllib.request.Request("inproc://api" + target, method=method, headers=headers or {})
        try:
            with _bridge_opener(handler).open(req, timeout=WAIT) as resp:
                return resp.status, resp.read(), seen
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(), seen


def _assert_refused(outcome):
    status, body, seen = outcome
    assert status == 401
    assert seen == [], "the app was called"
    assert KEY not in body


def _set(name, value):
    def alter(environ):
        environ[name] = value

    return alter


def _drop(*names):
    def alter(environ):
        for name in names or [k for k in list(environ) if k.startswith("HTTP_INPROC_")]:
            environ.pop(name, None)

    return alter


def _last_digit_changed(value):
    """``value`` with its last decimal digit changed."""
    for i in range(len(value) - 1, -1, -1):
        if value[i].isdigit():
            return value[:i] + str((int(value[i]) + 1) % 10) + value[i + 1:]
    raise AssertionError("no digit in %r" % (value,))


def _capture_signed(remote, target="/v1/chat?x=1", source=ib.SOURCE_AGENTS, actor="user-7"):
    """The environ (its str values) the wsgiref ``remote`` built for one request a keyed
    remote mount sent: a good request to replay by hand."""
    captured = []

    def capture(environ, start_response):
        captured.append({k: v for k, v in environ.items() if isinstance(v, str)})
        start_response("204 No Content", [])
        return []

    remote.app = capture
    with ib.InProcHandler(source=source, actor=actor) as handler:
        handler.mount("api", remote.url, key=KEY)
        with _bridge_opener(handler).open("inproc://api" + target, timeout=WAIT) as resp:
            assert resp.status == 204
    (environ,) = captured
    assert "HTTP_INPROC_SIGNATURE" in environ
    return environ


def _changed(captured, **changes):
    """A copy of ``captured`` with ``changes`` (None: the key removed)."""
    environ = dict(captured)
    for name, value in changes.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return environ


def _replayed(captured, **changes):
    """A fresh WSGI environ for the captured request, with ``changes``."""
    environ = _changed(captured, **changes)
    wsgiref.util.setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO(b"")
    return environ


def _call_wsgi(app, environ):
    """Call a WSGI app by hand: (status code, body)."""
    started = []

    def start_response(status, headers, exc_info=None):
        started.append(status)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return int(started[0].split()[0]), body


def _asgi_scope(environ):
    """The ASGI scope of the request a WSGI ``environ`` describes."""
    headers = [(k[5:].replace("_", "-").lower().encode("latin-1"), v.encode("latin-1"))
               for k, v in environ.items() if k.startswith("HTTP_")]
    path = environ["PATH_INFO"]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": environ["REQUEST_METHOD"], "scheme": "http", "path": path,
            "raw_path": urllib.parse.quote(path).encode("ascii"),
            "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 80)}


def _call_asgi(app, scope):
    """Call an ASGI app by hand with an empty body: (status, body)."""
    sent = []

    async def run():
        asked = []

        async def receive():
            if not asked:
                asked.append(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), WAIT)

    asyncio.run(run())
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def _key_forms(key):
    """The key as bytes, and as the encodings a careless sender might put it in."""
    forms = {key, key.hex().encode(), key.hex().upper().encode()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        forms |= {encode(key), encode(key).rstrip(b"=")}
    return forms


class _Actor:
    """An actor object that is not a str: it travels as str(actor)."""

    def __str__(self):
        return "user-7"


def _mounted(how, url, source=None, actor=None):
    """(opener, close) reaching ``url`` as inproc://api without a key, mounted ``how``."""
    apps = {"api": url} if how.endswith("apps") else None
    if how.startswith("handler"):
        handler = ib.InProcHandler(apps, source=source, actor=actor)
        if apps is None:
            handler.mount("api", url)
        return _bridge_opener(handler), handler.close
    factory = ib.OpenerFactory(apps)
    if apps is None:
        factory.mount("api", url)
    return _factory_opener(factory, source=source, actor=actor), factory.close


def test_remote_same_status_headers_and_body_as_in_process(any_remote):
    """The same client code, the app in-process and then behind trusted() on a real
    server: the caller sees the same responses, the app the same requests and tags."""
    kind = any_remote.kind
    local_seen, far_seen = [], []
    local = ib.OpenerFactory(
        {"api": _tags_recorded(kind, make_app(kind, _gateway(local_seen)), local_seen)})
    any_remote.app = ib.trusted(
        _tags_recorded(kind, make_app(kind, _gateway(far_seen)), far_seen), KEY)
    far = ib.OpenerFactory()
    try:
        far.mount("api", any_remote.url, key=KEY)
        views = [_gateway_calls(_factory_opener(factory, actor="user-7", source=ib.SOURCE_AGENTS),
                                KIND_TIMEOUT[kind])
                 for factory in (local, far)]
    finally:
        local.close()
        far.close()
    assert views[1] == views[0]
    assert far_seen == local_seen
    tags = ("scope" if kind == "asgi" else "environ", "agents", "user-7")
    assert tags in local_seen
    assert {s["source type"] for s in local_seen if isinstance(s, dict)} == {"Source"}


def test_remote_sse_streams_incrementally(any_remote):
    """The caller reads event 1 before the app is allowed to send event 2."""
    go, in_time = threading.Event(), []

    def logic(req):
        def events():
            yield b"event: token\ndata: 1\n\n"
            in_time.append(go.wait(WAIT))
            yield b"event: token\ndata: 2\n\n"

        return 200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")], events()

    any_remote.app = ib.trusted(make_app(any_remote.kind, logic), KEY)
    handler = ib.InProcHandler(source=ib.SOURCE_AGENTS)
    try:
        handler.mount("api", any_remote.url, key=KEY)
        with _bridge_opener(handler).open("inproc://api/v1/events", timeout=WAIT) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert [resp.readline() for _ in range(3)] == [b"event: token\n", b"data: 1\n", b"\n"]
            go.set()
            assert resp.read() == b"event: token\ndata: 2\n\n"
    finally:
        go.set()
        handler.close()
    assert in_time == [True], "event 1 reached the caller only after the app sent event 2"


@pytest.mark.parametrize("path, wire", [
    ("/v1/chat?x=1", ("/base/v1/chat", "x=1")),
    ("/v1/hello%20world?q=a%20b", ("/base/v1/hello world", "q=a%20b")),
    ("/", ("/base/", "")),
])
def test_remote_base_path_is_joined_with_the_callers_path(remote, path, wire):
    status, body, seen = _through(remote, base="/base", target=path)
    assert (status, body) == (200, b"ok")
    assert [(s["path"], s["query"]) for s in seen] == [wire]


def test_remote_mount_counts_as_mounted_for_intercept_http(remote):
    seen = []
    remote.app = ib.trusted(_plain_app(seen), KEY)
    with ib.InProcHandler(source=ib.SOURCE_AGENTS, intercept_http=True) as handler:
        handler.mount("api.internal", remote.url, key=KEY)
        with _bridge_opener(handler).open("http://api.internal/v1/chat?x=1", timeout=WAIT) as resp:
            assert resp.read() == b"ok"
    assert [(s["path"], s["query"], s["source"]) for s in seen] == [("/v1/chat", "x=1", "agents")]


def test_remote_timeout_raises_socket_timeout_when_the_server_never_answers():
    with _RawServer(answer=None) as silent, ib.InProcHandler(source=ib.SOURCE_AGENTS) as handler:
        handler.mount("api", silent.url, key=KEY)
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            _bridge_opener(handler).open("inproc://api/v1/chat", timeout=SHORT_TIMEOUT)
        assert time.monotonic() - started < WAIT
        assert silent.accepted.is_set(), "the request never reached the server"


def test_remote_timeout_between_body_chunks_raises_socket_timeout(remote):
    with _remote_stream(remote, SHORT_TIMEOUT) as (_, resp), pytest.raises(socket.timeout):
        resp.read()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", ["/elsewhere", "{remote}/elsewhere", "inproc://local/x",
                                      "http://local.internal/x"])
def test_remote_redirect_is_not_followed_and_never_into_the_bridge(remote, code, location):
    far_calls, local_calls = [], []
    target = location.format(remote=remote.url)

    def logic(req):
        far_calls.append(req.target)
        if req.target == "/go":
            return code, [("Location", target), ("Content-Type", "text/plain"),
                          ("Content-Length", "0")], []
        return 200, [("Content-Type", "text/plain"), ("Content-Length", "8")], [b"followed"]

    remote.app = ib.trusted(make_app(remote.kind, logic), KEY)
    with ib.OpenerFactory({"local": make_app("wsgi-worker", _ok(local_calls)),
                           "local.internal": make_app("wsgi-worker", _ok(local_calls))},
                          intercept_http=True) as factory:
        factory.mount("far", remote.url, key=KEY)
        with _http_error(code) as info:
            _factory_opener(factory).open("inproc://far/go", timeout=WAIT)
        assert info.value.headers["Location"] == target
    assert far_calls == ["/go"]
    assert local_calls == []


@pytest.mark.parametrize("how", ["handler mount", "factory mount", "handler apps", "factory apps"])
def test_remote_without_a_key_sends_no_inproc_headers(how):
    """A keyless mount, a URL in an apps mapping included: nothing Inproc-* on the wire,
    not the tags, not the caller's own Inproc-* headers; the other headers go through."""
    with _RawServer(_OK_ANSWER) as raw:
        opener, close = _mounted(how, raw.url, source=ib.SOURCE_AGENTS, actor="user-7")
        try:
            req = urllib.request.Request("inproc://api/v1?x=1",
                                         headers=dict(_FORGED, **{"X-Kept": "yes"}))
            with opener.open(req, timeout=WAIT) as resp:
                assert resp.read() == b"ok"
        finally:
            close()
    (data,) = raw.received
    assert data.startswith(b"GET /v1?x=1 HTTP/1.1\r\n")
    assert _inproc_headers(data) == []
    assert ("x-kept", "yes") in _request_headers(data)
    for word in (b"admin", b"root", b"forged", b"smuggled", b"agents", b"user-7"):
        assert word not in data


def test_remote_caller_set_inproc_headers_are_replaced_on_the_wire():
    with _RawServer(_OK_ANSWER) as raw:
        with ib.InProcHandler(source=ib.SOURCE_AGENTS, actor="user-7") as handler:
            handler.mount("api", raw.url, key=KEY)
            req = urllib.request.Request("inproc://api/v1", headers=_FORGED)
            req.add_unredirected_header("Inproc-signature", "forged too")
            with _bridge_opener(handler).open(req, timeout=WAIT) as resp:
                assert resp.read() == b"ok"
    (data,) = raw.received
    sent = _inproc_headers(data)
    assert sorted(name for name, _ in sent) == [
        "inproc-actor", "inproc-signature", "inproc-source", "inproc-time"]
    sent = dict(sent)
    assert (sent["inproc-source"], sent["inproc-actor"]) == ("agents", "user-7")
    assert sent["inproc-time"] != "0"
    for word in (b"admin", b"root", b"forged", b"smuggled"):
        assert word not in data


def test_remote_key_never_crosses_the_wire():
    requests = [
        urllib.request.Request("inproc://api/v1/chat?x=1"),
        urllib.request.Request("inproc://api/v1/chat", data=b"a body " * 100),
        urllib.request.Request("inproc://api/v1/items/7", data=b"{}", method="PUT",
                               headers={"Content-Type": "application/json"}),
    ]
    with _RawServer(_OK_ANSWER) as raw:
        with ib.InProcHandler(source=ib.SOURCE_AGENTS, actor="user-7") as handler:
            handler.mount("api", raw.url + "/base", key=KEY)
            for req in requests:
                with _bridge_opener(handler).open(req, timeout=WAIT) as resp:
                    assert resp.read() == b"ok"
    assert len(raw.received) == len(requests)
    for data in raw.received:
        assert "inproc-signature" in dict(_request_headers(data)), "the request was not signed"
        for form in _key_forms(KEY):
            assert form not in data, "the key went out as %r" % (form,)


@pytest.mark.parametrize("source, actor, sent", [
    (None, None, {}),
    (ib.SOURCE_AGENTS, None, {"inproc-source": "agents"}),
    (None, _Actor(), {"inproc-actor": "user-7"}),
    (ib.SOURCE_AGENTS, _Actor(), {"inproc-source": "agents", "inproc-actor": "user-7"}),
], ids=["neither", "source only", "actor only", "both"])
def test_remote_sends_a_tag_header_only_for_a_tag_that_is_set(remote, source, actor, sent):
    """None sends no header and reaches the app as None; an actor travels as str(actor)."""
    with _RawServer(_OK_ANSWER) as raw, ib.InProcHandler(source=source, actor=actor) as handler:
        handler.mount("api", raw.url, key=KEY)
        with _bridge_opener(handler).open("inproc://api/", timeout=WAIT) as resp:
            assert resp.read() == b"ok"
    (data,) = raw.received
    on_wire = dict(_inproc_headers(data))
    assert set(on_wire) == set(sent) | {"inproc-time", "inproc-signature"}
    assert {k: v for k, v in on_wire.items() if k in ("inproc-source", "inproc-actor")} == sent
    status, _, seen = _through(remote, source=source, actor=actor)
    assert status == 200
    expected = (sent.get("inproc-source"), sent.get("inproc-actor"))
    assert [((s["source"], s["actor"]), s["environ"]) for s in seen] == [(expected, expected)]


@pytest.mark.parametrize("source", [ib.SOURCE_AGENTS, None])
def test_trusted_caller_set_inproc_headers_never_reach_the_app(remote, source):
    status, body, seen = _through(remote, source=source, headers=_FORGED)
    assert (status, body) == (200, b"ok")
    assert [(s["source"], s["actor"], s["environ"]) for s in seen] == [
        (source, "user-7", (source, "user-7"))]
    assert seen[0]["inproc headers"] == []


def test_trusted_accepts_a_request_signed_with_the_right_key(remote):
    status, body, seen = _through(remote, method="POST", target="/v1/chat?x=1")
    assert (status, body) == (200, b"ok")
    (saw,) = seen
    assert type(saw["source"]) is ib.Source
    assert (saw["source"], saw["actor"], saw["environ"]) == ("agents", "user-7",
                                                             ("agents", "user-7"))
    assert (saw["method"], saw["path"], saw["query"]) == ("POST", "/v1/chat", "x=1")
    assert saw["inproc headers"] == []


def test_trusted_refuses_a_wrong_key(remote):
    _assert_refused(_through(remote, key=b"another secret"))


@pytest.mark.parametrize("actor", ["user-7", None], ids=["changed", "added"])
def test_trusted_refuses_a_tampered_actor(remote, actor):
    _assert_refused(_through(remote, _set("HTTP_INPROC_ACTOR", "root"), actor=actor))


@pytest.mark.parametrize("source", [ib.SOURCE_AGENTS, None], ids=["changed", "added"])
def test_trusted_refuses_a_tampered_source(remote, source):
    _assert_refused(_through(remote, _set("HTTP_INPROC_SOURCE", "admin"), source=source))


@pytest.mark.parametrize("name, value", [("PATH_INFO", "/v1/admin"), ("QUERY_STRING", "x=2"),
                                         ("QUERY_STRING", ""), ("REQUEST_METHOD", "DELETE")],
                         ids=["path", "query", "no query", "method"])
def test_trusted_refuses_a_tampered_path_or_method(remote, name, value):
    _assert_refused(_through(remote, _set(name, value)))


@pytest.mark.parametrize("name, change", [
    ("HTTP_INPROC_SIGNATURE", lambda signature: ("0" if signature[0] != "0" else "1")
     + signature[1:]),
    ("HTTP_INPROC_TIME", _last_digit_changed)], ids=["signature", "time"])
def test_trusted_refuses_a_tampered_signature_or_time(remote, name, change):
    def alter(environ):
        environ[name] = change(environ[name])

    _assert_refused(_through(remote, alter))


@pytest.mark.parametrize("names", [("HTTP_INPROC_SIGNATURE",), ("HTTP_INPROC_TIME",),
                                   ("HTTP_INPROC_SOURCE",), ("HTTP_INPROC_ACTOR",), ()],
                         ids=["signature", "time", "source", "actor", "every Inproc-*"])
def test_trusted_refuses_a_request_missing_a_header(remote, names):
    _assert_refused(_through(remote, _drop(*names)))


def test_trusted_refuses_forged_inproc_headers_sent_straight_to_the_server(remote):
    seen = []
    remote.app = ib.trusted(_plain_app(seen), KEY)
    forged = dict(_FORGED, **{"Inproc-Time": str(int(time.time())), "Inproc-Signature": "0" * 64})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with _http_error(401) as info:
        opener.open(urllib.request.Request(remote.url + "/v1/chat?x=1", headers=forged),
                    timeout=WAIT)
    assert KEY not in info.value.d_body
    with _http_error(401):  # nothing Inproc-* at all
        opener.open(remote.url + "/v1/chat?x=1", timeout=WAIT)
    assert seen == []


def test_trusted_refuses_a_signature_older_than_max_age(remote, monkeypatch):
    """A captured good request replayed by hand: let through inside max_age (no nonce is
    asked for), 401 once the clock has moved past it."""
    good = _capture_signed(remote)
    seen = []
    default = ib.trusted(_plain_app(seen), KEY)
    short = ib.trusted(_plain_app(seen), key=KEY, max_age=60)
    assert _call_wsgi(default, _replayed(good)) == (200, b"ok")
    skew = [0.0]
    real_time, real_time_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real_time() + skew[0])
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + int(skew[0] * 1e9))
    skew[0] = 200.0
    assert _call_wsgi(default, _replayed(good)) == (200, b"ok")
    assert _call_wsgi(short, _replayed(good))[0] == 401
    skew[0] = 310.0
    status, body = _call_wsgi(default, _replayed(good))
    assert status == 401
    assert KEY not in body
    assert len(seen) == 2


def test_trusted_compares_signatures_with_hmac_compare_digest(remote, monkeypatch):
    good = _capture_signed(remote)
    seen, compared = [], []
    guarded = ib.trusted(_plain_app(seen), KEY)
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert _call_wsgi(guarded, _replayed(good)) == (200, b"ok")
    assert compared, "trusted() let a request in without hmac.compare_digest"
    compared.clear()
    assert _call_wsgi(guarded, _replayed(good, HTTP_INPROC_ACTOR="root"))[0] == 401
    assert compared, "trusted() refused a request without hmac.compare_digest"
    assert len(seen) == 1


def test_trusted_asgi_app_checks_the_signature_and_sets_the_tags(remote):
    """The WSGI-captured good request, as an ASGI scope: in with the tags set as
    in-process (scope extension included) and no Inproc-* header; altered: 401."""
    good = _capture_signed(remote)
    seen = []

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        tags = scope.get("extensions", {}).get("inproc", {})
        seen.append((ib.current_source(), ib.current_actor(), tags.get("source"),
                     tags.get("actor"),
                     sorted(n for n, _ in scope["headers"] if n.startswith(b"inproc-"))))
        await _receive_messages(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = ib.trusted(app, KEY)
    assert _call_asgi(guarded, _asgi_scope(good)) == (200, b"ok")
    assert seen == [("agents", "user-7", "agents", "user-7", [])]
    for change in ({"HTTP_INPROC_ACTOR": "root"}, {"HTTP_INPROC_SIGNATURE": None},
                   {"PATH_INFO": "/v1/admin"}):
        status, body = _call_asgi(guarded, _asgi_scope(_changed(good, **change)))
        assert status == 401, change
        assert KEY not in body
    assert len(seen) == 1


def test_trusted_asgi_app_drops_inproc_headers_in_either_spelling(remote):
    """A signed request with Inproc_* headers a client added on its own: the ASGI
    app sees neither spelling, as a WSGI app behind trusted() sees no HTTP_INPROC_*."""
    good = _capture_signed(remote)
    seen = []

    async def app(scope, receive, send):
        seen.append(sorted(n for n, _ in scope["headers"] if n[:7] in (b"inproc-", b"inproc_")))
        await _receive_messages(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = _asgi_scope(good)
    scope["headers"] += [(b"inproc_source", b"admin"), (b"inproc_extra", b"smuggled")]
    assert _call_asgi(ib.trusted(app, KEY), scope) == (200, b"ok")
    assert seen == [[]]


@pytest.mark.parametrize("denial", [False, True], ids=["close", "denial-response"])
@pytest.mark.parametrize("forged", [False, True], ids=["unsigned", "forged"])
def test_trusted_asgi_app_refuses_an_unsigned_websocket(denial, forged):
    """A WebSocket handshake is a request too: unsigned (or forged) it never reaches
    the app, refused before it is accepted -- a close (the server answers 403), or 401
    where the server offers the ASGI denial-response extension."""
    seen, sent = [], []

    async def app(scope, receive, send):  # pragma: no cover - must not run
        seen.append(scope["type"])

    headers = [(b"host", b"api")] + [(name.lower().encode(), value.encode())
                                     for name, value in (_FORGED.items() if forged else ())]
    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "scheme": "ws", "path": "/ws", "raw_path": b"/ws", "query_string": b"",
             "root_path": "", "headers": headers, "subprotocols": [],
             "extensions": {"websocket.http.response": {}} if denial else {}}

    async def run():
        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(ib.trusted(app, KEY)(scope, receive, send), WAIT)

    asyncio.run(run())
    assert seen == []
    if denial:
        assert [m["type"] for m in sent] == ["websocket.http.response.start",
                                             "websocket.http.response.body"]
        assert sent[0]["status"] == 401
        assert KEY not in sent[1]["body"]
    else:
        assert [m["type"] for m in sent] == ["websocket.close"]


@pytest.mark.parametrize("app_kind", [*WSGI_KINDS, "asgi"])
def test_trusted_app_served_in_process_behaves_as_the_app_itself(app_kind):
    """The same calls to an app and to trusted(app) in-process: same responses, same
    requests and tags; the actor object itself, not its str()."""
    actor = ("user", 7)
    views, seen = [], {}
    for wrap in (_as_is, _guarded):
        saw = seen[wrap] = []
        app = wrap(_tags_recorded(app_kind, make_app(app_kind, _gateway(saw)), saw))
        with ib.OpenerFactory({"api": app}) as factory:
            views.append(_gateway_calls(
                factory.opener_for(actor=actor, source=ib.SOURCE_AGENTS), KIND_TIMEOUT[app_kind]))
    assert views[1] == views[0]
    assert seen[_guarded] == seen[_as_is]
    assert ("scope" if app_kind == "asgi" else "environ", "agents", actor) in seen[_guarded]


@pytest.mark.parametrize("wrap", ["as is", "trusted"])
def test_trusted_asgi_app_marked_lifespan_false_gets_no_lifespan_in_process(wrap):
    """trusted(ASGIApp(app, lifespan=False)) is served as ASGIApp(app,
    lifespan=False) is: the app, which does not speak lifespan, sees only
    its requests."""
    scopes, inner = [], _asgi_app()

    async def app(scope, receive, send):
        scopes.append(scope["type"])
        await inner(scope, receive, send)

    marked = ib.ASGIApp(app, lifespan=False)
    with Bridge({"api": marked if wrap == "as is" else ib.trusted(marked, KEY)}) as (opener, _):
        with opener.open("inproc://api/", timeout=WAIT) as resp:
            assert resp.read() == b"ok"
    assert scopes == ["http"]


@pytest.mark.parametrize("app_kind", [*WSGI_KINDS, "asgi"])
def test_trusted_app_in_process_keeps_the_bridges_tags_against_caller_set_headers(app_kind):
    seen = []

    def logic(req):
        seen.append((ib.current_source(), ib.current_actor()))
        return 200, [("Content-Type", "text/plain"), ("Content-Length", "2")], [b"ok"]

    with ib.OpenerFactory({"api": ib.trusted(make_app(app_kind, logic), KEY)}) as factory:
        req = urllib.request.Request("inproc://api/", headers=_FORGED)
        opener = factory.opener_for(source=ib.SOURCE_AGENTS, actor="user-7")
        with opener.open(req, timeout=KIND_TIMEOUT[app_kind]) as resp:
            assert resp.read() == b"ok"
    assert seen == [("agents", "user-7")]


@pytest.mark.parametrize("url", ["ftp://files.internal/x", "inproc://x", "file:///etc/passwd",
                                 "api.internal:8443/base"])
@pytest.mark.parametrize("how", ["handler mount", "factory mount", "handler apps", "factory apps"])
def test_remote_mount_refuses_a_url_that_is_not_http_or_https(url, how):
    scheme = urllib.parse.urlsplit(url).scheme
    with pytest.raises(ValueError, match=re.escape(scheme)):
        if how == "handler apps":
            ib.InProcHandler({"api": url})
        elif how == "factory apps":
            ib.OpenerFactory({"api": url})
        elif how == "handler mount":
            ib.InProcHandler().mount("api", url, key=KEY)
        else:
            ib.OpenerFactory().mount("api", url)


@pytest.mark.parametrize("key", ["shared secret", 42], ids=["str", "int"])
@pytest.mark.parametrize("how", ["handler", "factory", "trusted"])
def test_remote_mount_and_trusted_refuse_a_key_that_is_not_bytes(key, how):
    with pytest.raises(TypeError, match="bytes"):
        if how == "trusted":
            ib.trusted(_plain_app([]), key)
        elif how == "handler":
            ib.InProcHandler().mount("api", "https://gateway.internal:8443/base", key=key)
        else:
            ib.OpenerFactory().mount("api", "https://gateway.internal:8443/base", key=key)


@pytest.mark.parametrize("how", ["handler", "factory"])
def test_remote_mount_refuses_an_empty_key(how):
    """b"" is a key anyone has: the requests it signs could be anyone's."""
    mounts = ib.InProcHandler() if how == "handler" else ib.OpenerFactory()
    with pytest.raises(ValueError, match="empty"):
        mounts.mount("api", "https://gateway.internal:8443/base", key=b"")
    with pytest.raises(KeyError):
        mounts.unmount("api")  # nothing was mounted


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_trusted_refuses_an_empty_key(kind):
    """A service given b"" (a key read from an unset variable) would take
    any forged source and actor: it is refused when it is wrapped."""
    app = _plain_app([]) if kind == "wsgi" else _asgi_app()
    with pytest.raises(ValueError, match="empty"):
        ib.trusted(app, b"")


@pytest.mark.parametrize("max_age", [0, -1, -0.5])
def test_trusted_refuses_a_max_age_that_is_not_positive(max_age):
    with pytest.raises(ValueError, match="max_age"):
        ib.trusted(_plain_app([]), KEY, max_age=max_age)


# ---------------------------------------------------------------------------
# Interception: every urllib opener and http.client connection
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Interception: ib.intercept()
# ---------------------------------------------------------------------------
# What these tests take as given where the SPEC is silent (the choices a user of
# http.client and urllib would expect):
# - Clients.  "http.client" is http.client.HTTPConnection or HTTPSConnection
#   (the URL's scheme picks it; HTTPS with ssl.create_default_context());
#   "urlopen" is urllib.request.urlopen(url, context=...), which builds its own
#   opener; "opener" is an opener built with build_opener() BEFORE the block.
#   Every behaviour that every app kind shares runs on each of them.
# - What http.client shows: the response is an http.client.HTTPResponse (a
#   subclass counts), with status, reason, headers and read() as over TCP;
#   several requests (HEAD included) go over one HTTPConnection object one
#   after the other, as keep-alive does; a subclass of HTTPConnection that
#   overrides nothing is served as HTTPConnection is.  A timeout before the head
#   is raised by getresponse() (request() of a GET returns: over TCP a server
#   that accepted the connection and is slow does not make send() fail).
# - "As over TCP" for http.client: a handler class mounted in the block reads
#   the request line, headers and raw body that it reads behind a loopback
#   server (no header http.client did not send, e.g. no Connection: close; a
#   chunked body stays chunked), and http.client shows the same status,
#   reason, headers (less _NOT_COMPARED) and body for what the handler sends.
# - Request bodies stream on http.client as on urllib: the app reads the first
#   part before the caller has produced the rest.  Tested on the kinds with a
#   timeout only: WSGI in the caller's thread cannot run while the caller is
#   still inside request().
# - A timeout is socket.timeout (TimeoutError on 3.10+), never a URLError, on
#   the urllib paths as on http.client; the app then sees cancelled() set.
# - A status >= 400 is an HTTPError on the urllib paths and a plain response on
#   http.client (http.client never raises for a status); an app failing before
#   its head answers 500 on both.
# - network=False: the BridgeError names the host (the port may follow); for
#   http.client it comes from request() or connect(), and conn.sock stays None.
#   intercept() with no apps and network=False is the "nothing leaves the
#   machine" switch.  A redirect from an in-process app to a host no block
#   mounts is refused the same way (the redirect would be a new connection).
# - intercept(handler) serves the handler's own mount table, so mounts and
#   unmounts made on that handler (or on the factory given to intercept(factory))
#   inside the block act at once, as a factory's openers see later mounts.
#   The object the block yields is an InProcHandler in every case (for
#   intercept(handler) it need not be the handler itself).
# - A mount name that mount() refuses is refused by intercept({...}) with the
#   same ValueError (as InProcHandler({...}) refuses it), before anything is
#   patched.  Arguments after apps are keyword-only (TypeError otherwise).
# - Nesting: a host an outer block mounts and the inner one does not is served
#   by the outer block; a host no active block mounts follows the innermost
#   block's network.  An exception (a BaseException too) leaves the block with
#   everything restored, and is the same exception object.
# - Restoration is checked by identity over every attribute of the classes and
#   modules a patch could touch (_ICPT_WATCHED), minus __warningregistry__ (a
#   warning may add one to any module): after the outermost block, and after an
#   import of inproc_bridge alone (in a fresh interpreter), nothing differs.
#   urllib's own global opener is left alone by these tests (a bare urlopen()
#   installs one the first time); tests that call urlopen() without a context
#   reset it with monkeypatch.
# - An opener or connection made INSIDE the block and used after it goes to the
#   network, as one made after the block would.
# - record=True: call.url is the http(s) URL of the request as urllib would
#   write it ("http://api.internal/v1?x=1"; no default port); call.mount the
#   name the app was mounted as; hosts that went to the network are not calls.
#   Without record= the block's bridge has calls None, as InProcHandler has.
# - The block's own bridge (made from a mapping) may be closed by the block or
#   not: these tests close it afterwards themselves (close() is idempotent).
# - Environment proxies: tests that reach the loopback server through urllib
#   clear the *_proxy variables (a CI machine may set them).
# - Optional SDK: slack_sdk's WebClient(ssl=ctx) calls urlopen(req,
#   context=ctx, timeout=...) (slack_sdk/web/base_client.py 3.47.0); the
#   frameworks venv needs slack-sdk for it (.ci/run pins).

# Hosts the apps of this section are mounted as.
_ICPT_HOST = "api.internal"
_ICPT_HOST_RE = re.escape(_ICPT_HOST)
_ICPT_LOOPBACK = re.escape("127.0.0.1")  # what a BridgeError for the loopback server names
# The paths every shared behaviour runs on: (client, scheme).
_ICPT_PATHS = [pytest.param("http.client", "http", id="HTTPConnection"),
               pytest.param("http.client", "https", id="HTTPSConnection"),
               pytest.param("urlopen", "https", id="urlopen-context"),
               pytest.param("opener", "http", id="opener-built-before")]
# Short enough to make a timeout test quick, long enough for a loaded machine
# to hand over a chunk that is ready.
_ICPT_SHORT = 0.25
# Everything a patch for interception could touch: each module's and each
# class's own attributes are compared by identity before and after.
_ICPT_WATCHED = (
    "http.client", "http.client.HTTPConnection", "http.client.HTTPSConnection",
    "http.client.HTTPResponse", "urllib.request", "urllib.request.OpenerDirector",
    "urllib.request.BaseHandler", "urllib.request.AbstractHTTPHandler",
    "urllib.request.HTTPHandler", "urllib.request.HTTPSHandler",
    "urllib.request.ProxyHandler", "urllib.request.HTTPRedirectHandler",
    "urllib.request.HTTPErrorProcessor", "urllib.request.FTPHandler",
    "urllib.request.CacheFTPHandler", "urllib.request.Request", "socket", "socket.socket",
    "ssl", "ssl.SSLContext", "ssl.SSLSocket", "xmlrpc.client", "xmlrpc.client.Transport",
)
_ICPT_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def _icpt_resolve(dotted):
    """The module or class named ``dotted`` (stdlib only)."""
    import importlib

    try:
        return importlib.import_module(dotted)
    except ImportError:
        module, _, name = dotted.rpartition(".")
        return getattr(_icpt_resolve(module), name)


def _icpt_snapshot(watched):
    """{(owner, attribute): value} of every attribute of each watched owner."""
    return {(dotted, name): value for dotted in watched
            for name, value in vars(_icpt_resolve(dotted)).items() if name != "__warningregistry__"}


def _icpt_changes(before, after):
    """The attributes added, removed or rebound between two snapshots."""
    missing = object()
    return sorted("%s.%s" % key for key in before.keys() | after.keys()
                  if before.get(key, missing) is not after.get(key, missing))


def _icpt_unpatched(before):
    """What differs now from ``before`` (an _icpt_snapshot())."""
    return _icpt_changes(before, _icpt_snapshot(_ICPT_WATCHED))


@functools.lru_cache(maxsize=None)
def _icpt_tls():
    """One TLS context, as SDKs pass one (made once: it loads the CA store)."""
    return ssl.create_default_context()


class _IcptConnection(http.client.HTTPConnection):
    """A subclass defined before any block, as client libraries define theirs."""

    made_by = "a client library"


class _IcptStamp(urllib.request.BaseHandler):
    """A processor that marks every request of its opener (X-Stamp)."""

    def __init__(self, stamp):
        self.stamp = stamp

    def http_request(self, req):
        req.add_unredirected_header("X-Stamp", self.stamp)
        return req

    https_request = http_request


def _icpt_no_proxies(monkeypatch):
    for name in _ICPT_PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def _icpt_block(apps, **kwargs):
    """ib.intercept(apps, **kwargs); its bridge is closed after the block."""
    bridge = None
    try:
        with ib.intercept(apps, **kwargs) as bridge:
            yield bridge
    finally:
        if bridge is not None:
            bridge.close()


@contextlib.contextmanager
def _icpt_open(client, url, timeout=WAIT, opener=None, method="GET", body=None, headers=()):
    """The response to one request for ``url`` made through ``client``
    ("http.client", "urlopen" or "opener", which uses ``opener``); closed
    (its connection too) afterwards.  urllib raises HTTPError for >= 400."""
    headers = dict(headers)
    if client == "http.client":
        parts = urllib.parse.urlsplit(url)  # the host as written: its case, its port
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=_icpt_tls())
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
        try:
            conn.request(method, urllib.parse.urlunsplit(("", "", parts.path or "/",
                                                          parts.query, "")),
                         body=body, headers=headers)
            with conn.getresponse() as resp:
                yield resp
        finally:
            conn.close()
        return
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    if client == "urlopen":
        resp = urllib.request.urlopen(req, timeout=timeout, context=_icpt_tls())
    elif client == "opener":
        resp = opener.open(req, timeout=timeout)
    else:
        raise ValueError("unknown client %r" % (client,))
    with resp:
        yield resp


def _icpt_get(client, url, timeout=WAIT, opener=None, **kwargs):
    """The body of the response to ``url`` through ``client``."""
    with _icpt_open(client, url, timeout, opener, **kwargs) as resp:
        return resp.read()


class _IcptServer(_LoopbackHTTPServer):
    """A loopback server that counts the connections it accepted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accepts = 0
        self.base = "http://127.0.0.1:%d" % self.server_address[1]
        self.name = "127.0.0.1:%d" % self.server_address[1]  # as a mount name

    def get_request(self):
        pair = super().get_request()
        self.accepts += 1
        return pair


class _IcptNetHandler(QuietHandler):
    """What the network answers: b"net"."""

    def do_GET(self):
        _respond(self, body=b"net", headers=[("Content-Type", "text/plain")])


@contextlib.contextmanager
def _icpt_loopback(handler=_IcptNetHandler):
    """A counting loopback server serving ``handler``; shut down afterwards."""
    with _serving(_IcptServer(("127.0.0.1", 0), handler)) as server:
        yield server


def _icpt_net(server):
    """GET the loopback server's root over the network (no proxies): its body.
    The server handles connections in the order they arrived, so once this
    returns, every connection made before it has been counted."""
    with _net_opener().open(server.base + "/", timeout=WAIT) as resp:
        return resp.read()


def _icpt_dead_port():
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _icpt_echo(seen=None):
    """logic: 200 and b"in-process <target>"; ``seen`` records each request."""

    def logic(req):
        if seen is not None:
            seen.append(req)
        out = b"in-process " + req.target.encode("latin-1")
        return 200, [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))], (
            [] if req.method == "HEAD" else [out])

    return logic


def _icpt_wsgi(body=b"in-process"):
    return make_app("wsgi-inline", _answer(body=body))


# ---------------------------------------------------------------------------
# Real clients written by others


@pytest.mark.parametrize("protocol", ["HTTP/1.0", "HTTP/1.1"])
def test_intercept_xmlrpc_server_proxy_with_its_default_transport(protocol):
    """xmlrpc.client.ServerProxy as it comes (its Transport speaks
    http.client) against SimpleXMLRPCRequestHandler mounted in the block:
    the same answers as over loopback, every call on one HTTPConnection."""
    with _rpc_server(bind=True) as net_server:
        port = net_server.server_address[1]
        with xmlrpc.client.ServerProxy("http://127.0.0.1:%d/" % port, allow_none=True) as proxy:
            expected = _rpc_session(proxy)
    handler = type("IcptRPCHandler", (xmlrpc.server.SimpleXMLRPCRequestHandler,),
                   {"protocol_version": protocol})
    with _rpc_server(bind=False) as server, _icpt_block(None, source=ib.SOURCE_AGENTS,
                                                        network=False) as bridge:
        bridge.mount("rpc.internal", handler, server=server)
        with xmlrpc.client.ServerProxy("http://rpc.internal/", allow_none=True) as proxy:
            assert proxy.pow(2, 3) == 8
            # xmlrpc's Transport keeps its HTTPConnection in _connection
            conn = proxy("transport")._connection[1]
            assert isinstance(conn, http.client.HTTPConnection)
            got = _rpc_session(proxy)
            assert proxy.source() == "agents"
            assert proxy("transport")._connection[1] is conn
    assert got == expected
    assert expected[0] == 1024 and expected[2] == 3.5


def test_intercept_http_client_get(app_kind):
    seen = []

    def logic(req):
        seen.append((req.method, req.target, req.headers["Host"], req.headers["X-A"]))
        return 201, [("Content-Type", "text/plain"), ("X-B", "c")], [b"got ", req.target.encode()]

    timeout = KIND_TIMEOUT[app_kind]
    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic)}, network=False):
        for conn in (http.client.HTTPConnection(_ICPT_HOST, timeout=timeout),
                     _IcptConnection(_ICPT_HOST, timeout=timeout)):
            try:
                conn.request("GET", "/v1?x=1", headers={"X-A": "b"})
                resp = conn.getresponse()
                assert isinstance(resp, http.client.HTTPResponse)
                assert (resp.status, resp.reason) == (201, "Created")
                assert resp.getheader("X-B") == "c"
                assert resp.headers.get_content_type() == "text/plain"
                assert resp.read() == b"got /v1?x=1"
                resp.close()
            finally:
                conn.close()
    assert seen == [("GET", "/v1?x=1", _ICPT_HOST, "b")] * 2


def test_intercept_http_client_post_with_a_body(app_kind):
    """A body as bytes (Content-Length), a file and an iterable (both chunked,
    as http.client sends them) reaches the app whole."""
    seen = []

    def logic(req):
        seen.append((req.method, req.body))
        return 200, [("Content-Type", "text/plain")], [b"%d bytes" % len(req.body)]

    payload = b"payload " * 1000
    bodies = [payload, io.BytesIO(payload), iter([payload[:3], b"", payload[3:]])]
    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic)}, network=False):
        conn = http.client.HTTPConnection(_ICPT_HOST, timeout=KIND_TIMEOUT[app_kind])
        try:
            for body in bodies:
                conn.request("POST", "/p", body=body,
                             headers={"Content-Type": "application/octet-stream"})
                with conn.getresponse() as resp:
                    assert resp.status == 200
                    assert resp.read() == b"%d bytes" % len(payload)
        finally:
            conn.close()
    assert seen == [("POST", payload)] * 3


def test_intercept_http_client_keep_alive(app_kind):
    """Several requests, HEAD among them, one after the other on one
    HTTPConnection object, as keep-alive makes them."""
    seen = []
    with _icpt_block({_ICPT_HOST: make_app(app_kind, _icpt_echo(seen))}, network=False):
        conn = http.client.HTTPConnection(_ICPT_HOST, timeout=KIND_TIMEOUT[app_kind])
        try:
            for method, path, body in (("GET", "/1", None), ("POST", "/2", b"two"),
                                       ("HEAD", "/3", None), ("GET", "/4?q=4", None)):
                conn.request(method, path, body=body)
                resp = conn.getresponse()
                assert resp.status == 200
                assert resp.read() == (b"" if method == "HEAD" else b"in-process " + path.encode())
                assert resp.isclosed()
        finally:
            conn.close()
    assert [(r.method, r.target, r.body) for r in seen] == [
        ("GET", "/1", b""), ("POST", "/2", b"two"), ("HEAD", "/3", b""), ("GET", "/4?q=4", b"")]


def _icpt_exchanges(conn, requests):
    """What http.client shows of each (method, target, body, headers) request
    made on ``conn`` one after the other: (status, reason, headers but those
    a server sets itself or that frame the body, body)."""
    out = []
    for method, target, body, headers in requests:
        conn.request(method, target, body=body, headers=headers)
        with conn.getresponse() as resp:
            out.append((resp.status, resp.reason,
                         [(k.lower(), v) for k, v in resp.getheaders()
                          if k.lower() not in _NOT_COMPARED], resp.read()))
    return out


def test_intercept_http_client_request_reaches_the_app_as_over_tcp():
    """The same requests on one HTTPConnection to a loopback server and to the
    same handler class mounted in the block: the app reads the same request
    line, headers and raw body (chunked framing included) in both."""
    requests = [("GET", "/x?y=1", None, {"X-A": "b"}),
                ("POST", "/p", b"abc", {"Content-Type": "text/plain"}),
                ("POST", "/chunked", iter([b"ab", b"", b"cd"]), {}),
                ("PUT", "/file", io.BytesIO(b"file body"), {"X-B": "c"}),
                ("DELETE", "/d", None, {})]
    with _icpt_loopback(_RequestEchoHandler) as server:
        with contextlib.closing(http.client.HTTPConnection(server.name, timeout=WAIT)) as conn:
            expected = _icpt_exchanges(conn, requests)
    requests[2:4] = [("POST", "/chunked", iter([b"ab", b"", b"cd"]), {}),
                     ("PUT", "/file", io.BytesIO(b"file body"), {"X-B": "c"})]
    with _icpt_block({_ICPT_HOST: _RequestEchoHandler}, network=False):
        with contextlib.closing(http.client.HTTPConnection(_ICPT_HOST, timeout=WAIT)) as conn:
            got = _icpt_exchanges(conn, requests)
    assert [g[3] for g in got] == [e[3] for e in expected]
    assert got == expected


def test_intercept_http_client_response_is_what_tcp_gives():
    """Responses a handler class frames itself (chunked with a trailer,
    close-delimited, sized) and send_error() pages, HEAD included, read
    through http.client from a loopback server and from the block."""
    for handler, targets in ((_HandWrittenFramingHandler, ["/chunked", "/close", "/sized"]),
                             (_SendErrorHandler, ["/teapot", "/unavailable", "/nothing"])):
        requests = [(method, target, None, {}) for target in targets
                    for method in ("GET", "HEAD")
                    if handler is _SendErrorHandler or method == "GET"]
        expected = []
        with _icpt_loopback(handler) as server:
            for request in requests:  # a connection each: some close theirs
                conn = http.client.HTTPConnection(server.name, timeout=WAIT)
                try:
                    expected += _icpt_exchanges(conn, [request])
                finally:
                    conn.close()
        with _icpt_block({_ICPT_HOST: handler}, network=False):
            with contextlib.closing(http.client.HTTPConnection(_ICPT_HOST, timeout=WAIT)) as conn:
                got = _icpt_exchanges(conn, requests)
        assert got == expected, handler.__name__


@pytest.mark.parametrize("app_kind", TIMED_KINDS)
@pytest.mark.parametrize("client", ["http.client", "urlopen"])
def test_intercept_request_body_streams_to_the_app(app_kind, client):
    """The app reads the first part of a streamed request body before the
    caller has produced the rest, on http.client as on urllib (over TCP a
    server reads what has arrived).  Not for WSGI in the caller's thread:
    there the app cannot run while the caller is still sending."""
    got_first, seen = threading.Event(), []

    def logic(req):
        seen.append(req.read(len(FIRST)))
        got_first.set()
        seen.append(req.body)
        return 200, [("Content-Type", "text/plain")], [b"read"]

    def body():
        yield FIRST
        seen.append(got_first.wait(WAIT))
        yield b"rest"

    timeout = KIND_TIMEOUT[app_kind]
    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic, stream=True)}, network=False):
        assert _icpt_get(client, "http://api.internal/upload", timeout, method="POST",
                         body=body(), headers={"Content-Type": "text/plain"}) == b"read"
    assert seen == [FIRST, True, b"rest"]  # True: the app had FIRST before "rest" was made


@pytest.mark.parametrize(("client", "scheme"), _ICPT_PATHS)
def test_intercept_streams_the_response_incrementally(app_kind, client, scheme):
    """The first chunk reaches the caller while the app still waits for the
    caller to have read it: the response is not buffered."""
    gate, waited = threading.Event(), []
    app = make_app(app_kind, lambda req: (
        200, [("Content-Type", "text/event-stream")], _held_stream(gate, waited)))
    opener = urllib.request.build_opener()
    with _icpt_block({_ICPT_HOST: app}):
        with _icpt_open(client, "%s://%s/stream" % (scheme, _ICPT_HOST),
                        KIND_TIMEOUT[app_kind], opener) as resp:
            assert resp.status == 200
            assert resp.read(len(FIRST)) == FIRST
            gate.set()
            assert resp.read() == b"second|third"
    assert waited == [True]


@pytest.mark.parametrize(("client", "scheme"), _ICPT_PATHS)
def test_intercept_app_sees_the_scheme_and_host(app_kind, client, scheme):
    """https:// URLs and HTTPSConnection reach the app as https (WSGI's
    wsgi.url_scheme, ASGI's scope["scheme"]), with the Host as sent."""
    seen = []

    class SchemeHandler(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            seen.append((None, self.headers["Host"]))
            _respond(self, body=b"ok")

    def wsgi_app(environ, start_response):
        seen.append((environ["wsgi.url_scheme"], environ["HTTP_HOST"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    async def asgi_app(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        seen.append((scope["scheme"], dict(scope["headers"])[b"host"].decode()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = {"handler": SchemeHandler, "asgi": asgi_app}.get(app_kind, wsgi_app)
    opener = urllib.request.build_opener()
    with _icpt_block({_ICPT_HOST: app}):
        assert _icpt_get(client, "%s://%s/s" % (scheme, _ICPT_HOST),
                         KIND_TIMEOUT[app_kind], opener) == b"ok"
    assert seen == [(None if app_kind == "handler" else scheme, _ICPT_HOST)]


def test_intercept_urlopen_with_a_context():
    """urlopen(..., context=...) builds a fresh opener of its own: served."""
    seen = []
    with _icpt_block({_ICPT_HOST: make_app("wsgi-worker", _icpt_echo(seen))}):
        for url in ("https://api.internal/a?b=c", "http://api.internal/d"):
            with urllib.request.urlopen(url, timeout=WAIT, context=_icpt_tls()) as resp:
                assert resp.geturl() == url
                assert resp.read() == b"in-process " + url.split(_ICPT_HOST)[1].encode()
    assert [r.target for r in seen] == ["/a?b=c", "/d"]


def test_intercept_urlretrieve_streams_into_a_file(tmp_path, monkeypatch):
    """urlretrieve (bare urlopen underneath: urllib's global opener, built
    inside the block here) writes the whole body; a body that fails half way
    raises, never leaves a short file reported as whole."""
    monkeypatch.setattr(urllib.request, "_opener", None)
    _icpt_no_proxies(monkeypatch)
    body = bytes(range(256)) * 1200  # 300 KiB: many of urlretrieve's 8 KiB blocks

    def logic(req):
        if req.path == "/broken":
            def broken():
                yield b"x" * 100
                raise AppFault("failed half way")

            return 200, [("Content-Type", "application/octet-stream")], broken()
        return 200, [("Content-Type", "application/octet-stream"),
                     ("Content-Length", str(len(body)))], (
            body[i:i + 10000] for i in range(0, len(body), 10000))

    blocks = []
    with _icpt_block({_ICPT_HOST: make_app("wsgi-worker", logic)}):
        filename, headers = urllib.request.urlretrieve(
            "http://api.internal/file.bin", tmp_path / "file.bin",
            lambda count, size, total: blocks.append(total))
        with pytest.raises(ALLOWED):
            urllib.request.urlretrieve("http://api.internal/broken", tmp_path / "broken.bin")
    assert (tmp_path / "file.bin").read_bytes() == body
    assert str(filename) == str(tmp_path / "file.bin")
    assert headers["Content-Length"] == str(len(body))
    assert len(blocks) > 2 and set(blocks) == {len(body)}


def test_intercept_openers_and_names_taken_before_the_block():
    """An opener built before the block (its processors apply), and urlopen,
    build_opener and HTTPConnection taken by name before it (as a module that
    did `from urllib.request import urlopen` holds them)."""
    seen = []
    before = urllib.request.build_opener(_IcptStamp("built before"))
    plain = urllib.request.build_opener()
    urlopen, build_opener = urllib.request.urlopen, urllib.request.build_opener
    connection = http.client.HTTPConnection
    with _icpt_block({_ICPT_HOST: make_app("wsgi-inline", _icpt_echo(seen))}):
        with before.open("http://api.internal/1", timeout=WAIT) as resp:
            assert resp.read() == b"in-process /1"
        assert _icpt_get("opener", "https://api.internal/2", opener=plain) == b"in-process /2"
        with urlopen("https://api.internal/3", context=_icpt_tls()) as resp:
            assert resp.read() == b"in-process /3"
        with build_opener().open("http://api.internal/4") as resp:
            assert resp.read() == b"in-process /4"
        with contextlib.closing(connection(_ICPT_HOST)) as conn:
            conn.request("GET", "/5")
            assert conn.getresponse().read() == b"in-process /5"
    assert [(r.target, r.headers.get("X-Stamp")) for r in seen] == [
        ("/1", "built before"), ("/2", None), ("/3", None), ("/4", None), ("/5", None)]


def test_intercept_serves_the_installed_opener(monkeypatch):
    monkeypatch.setattr(urllib.request, "_opener", None)  # put back after the test
    urllib.request.install_opener(urllib.request.build_opener(_IcptStamp("installed")))
    seen = []
    with _icpt_block({_ICPT_HOST: make_app("handler", _icpt_echo(seen))}):
        with urllib.request.urlopen("http://api.internal/i", timeout=WAIT) as resp:
            assert resp.read() == b"in-process /i"
    assert [(r.target, r.headers.get("X-Stamp")) for r in seen] == [("/i", "installed")]


def test_intercept_urllib_rules_apply(app_kind):
    """HTTPError for an error status, redirects followed within the mounted
    hosts under the opener's redirect handler, on every urllib path."""
    calls = []
    app = make_app(app_kind, _route_logic(calls))
    timeout = KIND_TIMEOUT[app_kind]
    opener = urllib.request.build_opener()
    with _icpt_block({_ICPT_HOST: app, "other.internal": app}, network=False):
        for client in ("urlopen", "opener"):
            with _http_error(418) as info:
                _icpt_get(client, "https://api.internal/teapot", timeout, opener)
            assert info.value.d_body == b"no coffee"
            url = "http://api.internal/go?" + urllib.parse.urlencode(
                {"code": 302, "to": "https://other.internal/echo"})
            with _icpt_open(client, url, timeout, opener, body=b"q") as resp:
                assert resp.geturl() == "https://other.internal/echo"
                assert b'"method": "GET"' in resp.read()
        # http.client follows nothing and raises for no status
        with _icpt_open("http.client", "http://api.internal/teapot", timeout) as resp:
            assert (resp.status, resp.read()) == (418, b"no coffee")
    assert [c[1] for c in calls] == ["/teapot", "/go", "/echo"] * 2 + ["/teapot"]


# ---------------------------------------------------------------------------
# Timeouts, errors, source and actor on every path


@pytest.mark.parametrize("app_kind", TIMED_KINDS)
@pytest.mark.parametrize("client", ["http.client", "urlopen"])
def test_intercept_timeout_before_the_head_raises_socket_timeout(app_kind, client):
    state = {}

    def logic(req):
        state["cancelled"] = ib.cancelled().wait(WAIT)
        return 200, [("Content-Type", "text/plain"), ("Content-Length", "4")], [b"late"]

    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic, stream=True)}, network=False):
        started = time.monotonic()
        if client == "http.client":
            conn = http.client.HTTPConnection(_ICPT_HOST, timeout=_ICPT_SHORT)
            try:
                conn.request("GET", "/slow")
                with pytest.raises(socket.timeout):
                    conn.getresponse()
            finally:
                conn.close()
        else:
            with pytest.raises(socket.timeout) as info:
                urllib.request.urlopen("https://api.internal/slow", timeout=_ICPT_SHORT,
                                       context=_icpt_tls())
            assert not isinstance(info.value, urllib.error.URLError)
        assert time.monotonic() - started < 5
        assert _wait_for(lambda: "cancelled" in state)
    assert state["cancelled"] is True


@pytest.mark.parametrize("app_kind", TIMED_KINDS)
@pytest.mark.parametrize("client", ["http.client", "urlopen"])
def test_intercept_fault_delay_longer_than_the_timeout_raises_socket_timeout(app_kind, client):
    """A Fault's delay holds the head on every path of a block, http.client to a
    handler class included: past the caller's timeout, socket.timeout, and the
    app sees cancelled()."""
    state = {}

    def logic(req):
        state["cancelled"] = ib.cancelled()
        return 200, [("Content-Type", "text/plain"), ("Content-Length", "2")], [b"ok"]

    with _icpt_block({}, network=False) as bridge:
        bridge.mount(_ICPT_HOST, make_app(app_kind, logic), fault=ib.Fault(delay=WAIT))
        started = time.monotonic()
        with pytest.raises(socket.timeout) as info:
            _icpt_get(client, "http://api.internal/slow", timeout=_ICPT_SHORT)
        assert not isinstance(info.value, urllib.error.URLError)
        assert time.monotonic() - started < WAIT / 2
        assert _wait_for(lambda: "cancelled" in state)
        assert state["cancelled"].wait(WAIT), "the app was not told its caller is gone"


@pytest.mark.parametrize("app_kind", TIMED_KINDS)
@pytest.mark.parametrize(("client", "scheme"), _ICPT_PATHS)
def test_intercept_timeout_between_chunks_raises_from_read(app_kind, client, scheme):
    state = {}

    def logic(req):
        def chunks():
            yield b"first\n"
            state["cancelled"] = ib.cancelled().wait(WAIT)

        return 200, [("Content-Type", "text/plain")], chunks()

    opener = urllib.request.build_opener()
    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic)}, network=False):
        with _icpt_open(client, "%s://%s/" % (scheme, _ICPT_HOST), _ICPT_SHORT, opener) as resp:
            assert resp.readline() == b"first\n"
            with pytest.raises(socket.timeout):
                resp.readline()
        assert _wait_for(lambda: "cancelled" in state)
    assert state["cancelled"] is True


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "no-length"])
@pytest.mark.parametrize("how", ["read", "read(n)"])
@pytest.mark.parametrize("client", ["http.client", "urlopen"])
def test_intercept_error_mid_body_is_an_error(app_kind, client, how, length):
    """An app that fails after its head: reading raises, on http.client as on
    urllib, whether a Content-Length was promised or not (http.client's read(n)
    would end a short Content-Length body quietly)."""

    def logic(req):
        def chunks():
            yield b"x" * 10
            raise AppFault("failed after its head")

        headers = [("Content-Type", "text/plain")]
        if length:
            headers.append(("Content-Length", "100"))
        return 200, headers, chunks()

    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic)}, network=False):
        with _icpt_open(client, "https://api.internal/broken", KIND_TIMEOUT[app_kind]) as resp:
            assert resp.status == 200
            got, error = _read_to_error(resp, how)
    assert isinstance(error, ALLOWED), "a short body read as whole: %r" % (got,)
    assert (b"x" * 10).startswith(got)


@pytest.mark.parametrize(("client", "scheme"), _ICPT_PATHS)
def test_intercept_error_before_the_head_is_500(app_kind, client, scheme):
    def logic(req):
        raise AppFault("failed before its head")

    opener = urllib.request.build_opener()
    url = "%s://%s/boom" % (scheme, _ICPT_HOST)
    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic)}, network=False):
        if client == "http.client":
            with _icpt_open(client, url, KIND_TIMEOUT[app_kind]) as resp:
                assert resp.status == 500
                resp.read()
        else:
            with _http_error(500):
                _icpt_get(client, url, KIND_TIMEOUT[app_kind], opener)


def _tagged_204(seen, target=False):
    """Logic answering 204 that appends (current_source(), current_actor(),
    req.tags) to ``seen`` -- with ``target``: (req.target, source, actor)."""
    def logic(req):
        tags = (ib.current_source(), ib.current_actor())
        seen.append((req.target, *tags) if target else (*tags, req.tags))
        return 204, [], []

    return logic


@pytest.mark.parametrize(("client", "scheme"), _ICPT_PATHS)
def test_intercept_source_and_actor_reach_the_app(app_kind, client, scheme):
    seen = []
    logic = _tagged_204(seen)
    opener = urllib.request.build_opener()
    url = "%s://%s/who" % (scheme, _ICPT_HOST)
    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic)}, source=ib.SOURCE_AGENTS,
                     actor="user-7"):
        with _icpt_open(client, url, KIND_TIMEOUT[app_kind], opener) as resp:
            assert (resp.status, resp.read()) == (204, b"")
    tags = None if app_kind == "handler" else ("agents", "user-7")
    assert seen == [("agents", "user-7", tags)]
    assert type(seen[0][0]) is ib.Source
    assert ib.current_source() is None and ib.current_actor() is None


def test_intercept_without_source_or_actor_the_app_sees_none():
    seen = []
    logic = _tagged_204(seen)
    with _icpt_block({_ICPT_HOST: make_app("wsgi-worker", logic)}):
        assert _icpt_get("http.client", "http://api.internal/") == b""
    assert seen == [(None, None, (None, None))]


# ---------------------------------------------------------------------------
# What intercept() takes and yields


def test_intercept_is_public():
    assert "intercept" in ib.__all__
    with pytest.raises(TypeError):
        ib.intercept({}, False)  # network and the rest are keyword-only


def test_intercept_of_a_handler_takes_its_mounts_source_and_actor():
    seen = []
    logic = _tagged_204(seen, target=True)
    handler = ib.InProcHandler({_ICPT_HOST: make_app("wsgi-worker", logic)},
                               source="billing", actor="user-1")
    with ib.intercept(handler, network=False) as bridge:
        assert isinstance(bridge, ib.InProcHandler)
        assert _icpt_get("http.client", "http://api.internal/a") == b""
        handler.mount("late.internal", make_app("wsgi-worker", logic))  # acts at once
        assert _icpt_get("urlopen", "https://late.internal/b") == b""
        handler.unmount(_ICPT_HOST)
        with pytest.raises(ib.BridgeError, match=_ICPT_HOST_RE):
            _icpt_get("http.client", "http://api.internal/c")
    handler.close()
    assert seen == [("/a", "billing", "user-1"), ("/b", "billing", "user-1")]


def test_intercept_of_a_factory_takes_its_mounts_and_the_keywords():
    seen = []
    logic = _tagged_204(seen, target=True)
    with ib.OpenerFactory({_ICPT_HOST: make_app("wsgi-worker", logic)}) as factory:
        with ib.intercept(factory, source=ib.SOURCE_AGENTS, actor="user-7",
                          network=False) as bridge:
            assert isinstance(bridge, ib.InProcHandler)
            assert _icpt_get("http.client", "https://api.internal/a") == b""
            factory.mount("late.internal", make_app("wsgi-worker", logic))  # acts at once
            assert _icpt_get("http.client", "http://late.internal/b") == b""
        with ib.intercept(factory, network=False):
            assert _icpt_get("urlopen", "https://late.internal/c") == b""
    assert seen == [("/a", "agents", "user-7"), ("/b", "agents", "user-7"), ("/c", None, None)]


def test_intercept_mount_and_unmount_inside_the_block_act_at_once(app_kind):
    timeout = KIND_TIMEOUT[app_kind]
    with _icpt_block({_ICPT_HOST: make_app(app_kind, _answer(body=b"first"))},
                     network=False) as bridge:
        assert isinstance(bridge, ib.InProcHandler)
        assert _icpt_get("http.client", "http://api.internal/", timeout) == b"first"
        bridge.mount(_ICPT_HOST, make_app(app_kind, _answer(body=b"second")))
        assert _icpt_get("http.client", "http://api.internal/", timeout) == b"second"
        bridge.mount("late.internal:8080", make_app(app_kind, _answer(body=b"late")))
        assert _icpt_get("urlopen", "https://late.internal:8080/", timeout) == b"late"
        bridge.unmount(_ICPT_HOST)
        for client in ("http.client", "urlopen"):
            with pytest.raises(ib.BridgeError, match=_ICPT_HOST_RE):
                _icpt_get(client, "https://api.internal/", timeout)


@pytest.mark.parametrize("bad", [42, "api", b"api", [("api", None)], 1.5, object()],
                         ids=["int", "str", "bytes", "list", "float", "object"])
def test_intercept_of_what_is_not_apps_is_a_typeerror_naming_it(bad):
    before = _icpt_snapshot(_ICPT_WATCHED)
    with pytest.raises(TypeError, match=type(bad).__name__), ib.intercept(bad):
        pytest.fail("the block ran")
    assert _icpt_unpatched(before) == []


@pytest.mark.parametrize("name", ["bad host/", "api@evil", "caf\u00e9", "api:99999", "", 42])
def test_intercept_bad_mount_name_is_the_error_mount_gives(name):
    app = _icpt_wsgi()
    with pytest.raises((TypeError, ValueError)) as expected:
        ib.InProcHandler().mount(name, app)
    before = _icpt_snapshot(_ICPT_WATCHED)
    with _icpt_block({_ICPT_HOST: app}, network=False) as bridge:
        with pytest.raises(type(expected.value)) as info:
            bridge.mount(name, app)
        assert str(info.value) == str(expected.value)
        assert _icpt_get("http.client", "http://api.internal/") == b"in-process"
    assert _icpt_unpatched(before) == []
    if isinstance(name, str):  # a mapping with the bad name: refused before any patch
        with pytest.raises(ValueError) as info, ib.intercept({name: app}):
            pytest.fail("the block ran")
        assert str(info.value) == str(expected.value)
        assert _icpt_unpatched(before) == []


def test_intercept_record_keeps_the_http_urls(app_kind):
    timeout = KIND_TIMEOUT[app_kind]
    with _icpt_loopback() as server, _icpt_block(
            {_ICPT_HOST: make_app(app_kind, _icpt_echo())}, record=True,
            source=ib.SOURCE_AGENTS, actor="user-7") as bridge:
        assert _icpt_get("http.client", "http://api.internal/v1?x=1", timeout) == (
            b"in-process /v1?x=1")
        assert _icpt_get("http.client", "https://api.internal/p", timeout, method="POST",
                         body=b"abc") == b"in-process /p"
        assert _icpt_get("urlopen", "https://api.internal/u", timeout) == b"in-process /u"
        assert _icpt_get("http.client", server.base + "/", timeout) == b"net"  # not a call
        calls = list(bridge.calls)
        assert [_settled(c) for c in calls] == ["complete"] * 3
    assert [(c.method, c.url, c.mount, c.status, c.outcome) for c in calls] == [
        ("GET", "http://api.internal/v1?x=1", _ICPT_HOST, 200, "complete"),
        ("POST", "https://api.internal/p", _ICPT_HOST, 200, "complete"),
        ("GET", "https://api.internal/u", _ICPT_HOST, 200, "complete")]
    assert calls[1].request_body == b"abc" and calls[1].response_body == b"in-process /p"
    assert {(c.source, c.actor) for c in calls} == {("agents", "user-7")}
    with _icpt_block({_ICPT_HOST: _icpt_wsgi()}) as bridge:
        assert bridge.calls is None


# ---------------------------------------------------------------------------
# network=False, host matching, proxies, redirects from the network


def test_intercept_network_false_never_connects(monkeypatch):
    """Nothing reaches a loopback server while network=False: urllib (any
    opener) and http.client (request() and connect()) get a BridgeError naming
    the host; an in-process app's redirect there is refused too; mounted hosts
    are served."""
    _icpt_no_proxies(monkeypatch)
    with _icpt_loopback() as server:
        url = server.base + "/"
        opener = urllib.request.build_opener()
        app = make_app("wsgi-inline", lambda req: (
            302, [("Content-Type", "text/plain"), ("Location", url)], []))
        with _icpt_block({_ICPT_HOST: app}, network=False):
            for client in ("urlopen", "opener"):
                with pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK) as info:
                    _icpt_get(client, url, opener=opener)
                assert isinstance(info.value, urllib.error.URLError)
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=WAIT)
            with pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK):
                conn.connect()
            with pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK):
                conn.request("GET", "/")
            assert conn.sock is None
            conn.close()
            with pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK):
                _icpt_get("urlopen", "https://api.internal/go")
        with _icpt_block(None, network=False), pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK):
            _icpt_get("http.client", url)
        assert _icpt_net(server) == b"net"
        assert server.accepts == 1  # the request just made, and no other


@pytest.mark.parametrize("handler", [urllib.request.FTPHandler, urllib.request.CacheFTPHandler])
def test_intercept_network_false_refuses_ftp_urls(monkeypatch, handler):
    """ftp:// is urllib's other way out to a host: with network=False it is
    refused as http:// is, from urlopen() and from an opener built before the
    block, and nothing connects; with network=True it still connects."""
    _icpt_no_proxies(monkeypatch)
    monkeypatch.setattr(urllib.request, "_opener", None)  # put back after the test
    with _icpt_loopback() as server:
        url = "ftp://%s/file.txt" % server.name
        opener = urllib.request.build_opener(handler())
        with _icpt_block({_ICPT_HOST: _icpt_wsgi()}, network=False):
            for open_url in (urllib.request.urlopen, opener.open):
                with pytest.raises(ib.BridgeError, match="ftp://" + _ICPT_LOOPBACK) as info:
                    open_url(url, timeout=_ICPT_SHORT)
                assert isinstance(info.value, urllib.error.URLError)
        assert _icpt_net(server) == b"net"
        assert server.accepts == 1  # the request just made, and no other
        with _icpt_block({_ICPT_HOST: _icpt_wsgi()}):
            with pytest.raises(urllib.error.URLError) as info:
                opener.open(url, timeout=_ICPT_SHORT)  # an HTTP server: no FTP greeting
            assert not isinstance(info.value, ib.BridgeError)
        assert _icpt_net(server) == b"net"
        assert server.accepts == 3


def test_intercept_network_true_reaches_unmounted_hosts(monkeypatch):
    _icpt_no_proxies(monkeypatch)
    opener = urllib.request.build_opener()
    with _icpt_loopback() as server:
        with _icpt_block({_ICPT_HOST: _icpt_wsgi()}):
            for client in ("http.client", "urlopen", "opener"):
                assert _icpt_get(client, server.base + "/", opener=opener) == b"net"
            assert _icpt_get("http.client", "http://api.internal/") == b"in-process"
        assert server.accepts == 3


def test_intercept_host_matching_is_exact(app_kind):
    """Names match case-insensitively, with or without the scheme's default
    port; nothing else is caught: with network=False every miss is a
    BridgeError naming its host, for urllib and http.client."""
    timeout = KIND_TIMEOUT[app_kind]
    apps = {_ICPT_HOST: make_app(app_kind, _answer(body=b"api")),
            "ported.internal:8080": make_app(app_kind, _answer(body=b"ported"))}
    hits = [("http://api.internal/", b"api"), ("https://API.Internal/", b"api"),
            ("http://api.internal:80/", b"api"), ("https://api.internal:443/", b"api"),
            ("http://ported.internal:8080/", b"ported"),
            ("https://ported.internal:8080/", b"ported")]
    misses = ["http://api.internal:8080/", "https://api.internal:80/", "http://api.internal:443/",
              "http://api.internal.evil.com/", "https://api.internal.evil.com/",
              "http://evil.com/api.internal", "https://xapi.internal/",
              "http://ported.internal/", "https://ported.internal:80/"]
    with _icpt_block(apps, network=False):
        for url, body in hits:
            for client in ("http.client", "urlopen"):
                assert _icpt_get(client, url, timeout) == body, (client, url)
        for url in misses:
            for client in ("http.client", "urlopen"):
                with pytest.raises(ib.BridgeError) as info:
                    _icpt_get(client, url, timeout)
                assert urllib.parse.urlsplit(url).hostname in str(info.value), (client, url)


def test_intercept_not_caught_host_goes_to_the_network():
    """With network=True, api.internal.evil.com is not api.internal: it goes
    to the opener's own HTTP handler (which stands in for the network)."""
    fell, seen = [], []
    opener = _net_opener(FallThroughHTTP(fell), FallThroughHTTPS(fell))
    with _icpt_block({_ICPT_HOST: make_app("wsgi-inline", _icpt_echo(seen))}):
        for url in ("http://api.internal.evil.com/", "https://api.internal.evil.com/x",
                    "http://api.internal@evil.com/"):
            with pytest.raises(urllib.error.URLError) as info:
                opener.open(url, timeout=WAIT)
            assert not isinstance(info.value, ib.BridgeError)
        assert _icpt_get("opener", "http://api.internal/ok",
                         opener=urllib.request.build_opener()) == b"in-process /ok"
    assert fell == ["http://api.internal.evil.com/", "https://api.internal.evil.com/x",
                    "http://api.internal@evil.com/"]
    assert [r.target for r in seen] == ["/ok"]


def test_intercept_skips_environment_proxies_for_mounted_hosts(monkeypatch):
    _icpt_no_proxies(monkeypatch)
    proxy = "http://127.0.0.1:%d" % _icpt_dead_port()
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.setenv("https_proxy", proxy)
    opener = urllib.request.build_opener()  # its ProxyHandler has read them
    with _icpt_block({_ICPT_HOST: make_app("wsgi-worker", _icpt_echo())}):
        for client in ("urlopen", "opener"):
            for scheme in ("http", "https"):
                url = "%s://%s/p" % (scheme, _ICPT_HOST)
                assert _icpt_get(client, url, opener=opener) == b"in-process /p"
    # The proxies were in force: outside the block the same request goes to one.
    with pytest.raises(urllib.error.URLError) as info:
        opener.open("http://api.internal/p", timeout=WAIT)
    assert isinstance(info.value.reason, ConnectionRefusedError)


@pytest.mark.parametrize("location", ["http://api.internal/", "https://API.internal:443/v1",
                                      "//api.internal/relative-scheme"])
def test_intercept_network_response_cannot_redirect_into_the_block(monkeypatch, location):
    _icpt_no_proxies(monkeypatch)
    seen = []
    opener = urllib.request.build_opener()
    with _icpt_loopback(_network_redirector(location)) as server:
        with _icpt_block({_ICPT_HOST: make_app("wsgi-inline", _icpt_echo(seen))}):
            for client in ("urlopen", "opener"):
                with _http_error(302):
                    _icpt_get(client, server.base + "/", opener=opener)
            with _http_error(302):
                _net_opener().open(server.base + "/", timeout=WAIT)
    assert seen == []


# ---------------------------------------------------------------------------
# Restoration and nesting


def test_intercept_restores_everything_after_the_block(monkeypatch):
    """Mount the loopback server's own host:port: inside the block the same
    URL is served in-process, before and after it by the server; openers and
    connections made inside go to the network afterwards; nothing stays
    patched."""
    _icpt_no_proxies(monkeypatch)
    before = _icpt_snapshot(_ICPT_WATCHED)
    opener = urllib.request.build_opener()
    with _icpt_loopback() as server:
        url = server.base + "/"
        clients = ("http.client", "urlopen", "opener")
        assert [_icpt_get(c, url, opener=opener) for c in clients] == [b"net"] * 3
        app = make_app("wsgi-inline", _answer(body=b"in-process"))
        with _icpt_block({server.name: app}) as bridge:
            assert [_icpt_get(c, url, opener=opener) for c in clients] == [b"in-process"] * 3
            inside = urllib.request.build_opener()
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=WAIT)
        assert _icpt_unpatched(before) == []
        assert [_icpt_get(c, url, opener=opener) for c in clients] == [b"net"] * 3
        with inside.open(url, timeout=WAIT) as resp:
            assert resp.read() == b"net"
        try:
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"net"
        finally:
            conn.close()
        bridge.mount(server.name, _icpt_wsgi(b"remounted"))  # the block is over: no effect
        assert _icpt_get("urlopen", url) == b"net"
        assert server.accepts == 3 + 3 + 1 + 1 + 1
    assert _icpt_unpatched(before) == []


class _IcptStop(BaseException):
    """Not an Exception: the block must restore on any way out."""


@pytest.mark.parametrize("error", [AppFault, _IcptStop])
def test_intercept_exception_inside_restores_and_propagates(monkeypatch, error):
    _icpt_no_proxies(monkeypatch)
    before = _icpt_snapshot(_ICPT_WATCHED)
    raised = error("raised inside the block")
    with _icpt_loopback() as server:
        with pytest.raises(error) as info, _icpt_block({server.name: _icpt_wsgi()}):
            assert _icpt_get("http.client", server.base + "/") == b"in-process"
            raise raised
        assert info.value is raised
        assert _icpt_unpatched(before) == []
        assert _icpt_get("http.client", server.base + "/") == b"net"
        assert _icpt_get("urlopen", server.base + "/") == b"net"
        # an inner block that raises leaves the outer one as it was
        with _icpt_block({_ICPT_HOST: _icpt_wsgi(b"outer")}, network=False):
            with pytest.raises(error):
                with _icpt_block({_ICPT_HOST: _icpt_wsgi(b"inner")}, network=True):
                    assert _icpt_get("http.client", "http://api.internal/") == b"inner"
                    raise error("inner")
            assert _icpt_get("http.client", "http://api.internal/") == b"outer"
            with pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK):
                _icpt_get("http.client", server.base + "/")
        assert server.accepts == 2
    assert _icpt_unpatched(before) == []


def test_intercept_nested_blocks(monkeypatch):
    """The innermost block's mounts are tried first, then the outer ones'; a
    host no block mounts follows the innermost block's network; leaving each
    block restores the one around it, and the outermost nothing at all."""
    _icpt_no_proxies(monkeypatch)
    before = _icpt_snapshot(_ICPT_WATCHED)
    opener = urllib.request.build_opener()

    def get(url, client="http.client"):
        return _icpt_get(client, url, opener=opener)

    with _icpt_loopback() as server:
        net = server.base + "/"
        with _icpt_block({_ICPT_HOST: _icpt_wsgi(b"outer"),
                          "other.internal": _icpt_wsgi(b"other")}, network=True):
            assert get("http://api.internal/") == b"outer"
            assert get(net) == b"net"
            with _icpt_block({_ICPT_HOST: _icpt_wsgi(b"inner")}, network=False):
                for client in ("http.client", "urlopen", "opener"):
                    assert get("https://api.internal/", client) == b"inner"
                    assert get("http://other.internal/", client) == b"other"
                    with pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK):
                        get(net, client)
                with _icpt_block(None, network=True):
                    assert get(net) == b"net"
                    assert get("http://api.internal/") == b"inner"
                with pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK):
                    get(net)
            assert get("http://api.internal/", "urlopen") == b"outer"
            assert get(net, "urlopen") == b"net"
        assert _icpt_unpatched(before) == []
        with _icpt_block({_ICPT_HOST: _icpt_wsgi(b"outer")}, network=False):
            with _icpt_block({}, network=True):
                assert get(net, "opener") == b"net"
                assert get("http://api.internal/") == b"outer"
            with pytest.raises(ib.BridgeError, match=_ICPT_LOOPBACK):
                get(net, "opener")
        assert get(net) == b"net"
        assert server.accepts == 2 + 1 + 1 + 1
    assert _icpt_unpatched(before) == []


def test_intercept_import_and_a_block_leave_nothing_patched(tmp_path):
    """In a fresh interpreter: importing inproc_bridge patches nothing (the
    cost outside a block is nil), and neither does a block once it is over."""
    script = "\n".join([
        "import http.client, socket, ssl, urllib.request, xmlrpc.client",
        inspect.getsource(_icpt_resolve),
        inspect.getsource(_icpt_snapshot),
        inspect.getsource(_icpt_changes),
        "watched = %r" % (_ICPT_WATCHED,),
        "before = _icpt_snapshot(watched)",
        "import inproc_bridge as ib",
        "imported = _icpt_snapshot(watched)",
        "def app(environ, start_response):",
        "    start_response('200 OK', [('Content-Type', 'text/plain')])",
        "    return [b'in-process']",
        "with ib.intercept({'api.internal': app}, network=False):",
        "    conn = http.client.HTTPConnection('api.internal')",
        "    conn.request('GET', '/')",
        "    assert conn.getresponse().read() == b'in-process'",
        "    conn.close()",
        "print(_icpt_changes(before, imported), _icpt_changes(before, _icpt_snapshot(watched)))",
    ])
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(ib.__file__)),
               PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"


# ---------------------------------------------------------------------------
# Threads


def test_intercept_eight_threads_in_one_block(app_kind):
    """8 threads x 25 requests, each thread alternating its own keep-alive
    HTTPConnection and urlopen(context=...): every answer is its own."""
    timeout = KIND_TIMEOUT[app_kind]
    with _icpt_block({_ICPT_HOST: make_app(app_kind, _icpt_echo())}, network=False):

        def client(n):
            def run():
                conn = http.client.HTTPConnection(_ICPT_HOST, timeout=timeout)
                try:
                    for i in range(25):
                        path = "/t%d/%d" % (n, i)
                        if i % 2:
                            got = _icpt_get("urlopen", "https://api.internal" + path, timeout)
                        else:
                            conn.request("GET", path)
                            got = conn.getresponse().read()
                        assert got == b"in-process " + path.encode()
                finally:
                    conn.close()

            return run

        _run_threads([client(n) for n in range(8)], WAIT * 3)


def test_intercept_is_process_wide():
    """A thread that was running before the block and has its own context
    is served by the block while it is active, with the block's source."""
    seen, go, done, box = [], threading.Event(), threading.Event(), []

    def logic(req):
        seen.append(ib.current_source())
        return 200, [("Content-Type", "text/plain")], [b"in-process"]

    def other():
        go.wait(WAIT)
        try:
            box.append(_icpt_get("http.client", "http://api.internal/"))
        except ALLOWED as exc:  # handed to the test
            box.append(exc)
        done.set()

    thread = threading.Thread(target=other, name="icpt-other", daemon=True)
    thread.start()
    with _icpt_block({_ICPT_HOST: make_app("wsgi-worker", logic)}, source=ib.SOURCE_AGENTS,
                     network=False):
        go.set()
        assert done.wait(WAIT)
    thread.join(WAIT)
    assert box == [b"in-process"] and seen == ["agents"]


# ---------------------------------------------------------------------------
# An SDK as its users call it


@pytest.mark.optional
def test_intercept_slack_sdk_web_client():
    """slack_sdk's WebClient(ssl=ctx) calls urlopen(req, context=ctx): served."""
    web_client = _optional("slack_sdk").WebClient
    seen = []

    def slack(environ, start_response):
        seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"],
                     environ.get("HTTP_AUTHORIZATION"), environ["inproc.source"]))
        start_response("200 OK", [("Content-Type", "application/json; charset=utf-8")])
        return [b'{"ok": true, "user": "bot", "team": "T1"}']

    with _icpt_block({"slack.internal": slack}, source=ib.SOURCE_AGENTS, network=False):
        client = web_client(token="xoxb-test", base_url="https://slack.internal/api/",
                            ssl=_icpt_tls(), timeout=int(WAIT))
        resp = client.auth_test()
    assert resp["ok"] is True and resp["user"] == "bot"
    assert seen == [("POST", "/api/auth.test", "Bearer xoxb-test", "agents")]


# Found by review, one test each: what an attacker or a careless client could do.


@pytest.mark.parametrize("stamp", ["1" + "0" * 400, "9" * 13, "-5", " 12 ", "1e10", "\u0661\u0662"])
def test_trusted_refuses_an_odd_time_with_401_not_a_crash(stamp):
    """A huge, signed, spaced or non-ASCII Inproc-Time is a 401, from WSGI and
    ASGI alike -- never an exception (int() of 400 digits parses; float()
    of it overflows)."""
    wsgi = ib.trusted(_never_called_wsgi, KEY)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "QUERY_STRING": "", "SCRIPT_NAME": "",
               "HTTP_INPROC_TIME": stamp, "HTTP_INPROC_SIGNATURE": "00" * 32,
               "wsgi.input": io.BytesIO()}
    started = []
    wsgi(environ, lambda status, headers: started.append(status))
    assert started == ["401 Unauthorized"]

    async def never(scope, receive, send):  # pragma: no cover - must not run
        raise AssertionError("the ASGI app ran")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "raw_path": b"/x",
             "query_string": b"", "headers": [(b"inproc-time", stamp.encode("utf-8")),
                                              (b"inproc-signature", b"00" * 32)]}
    asyncio.run(ib.trusted(never, KEY)(scope, None, send))
    assert sent[0]["status"] == 401


def _never_called_wsgi(environ, start_response):  # pragma: no cover - must not run
    raise AssertionError("the WSGI app ran")


def test_trusted_refuses_a_signature_replayed_across_the_path_and_query(remote):
    """/x%3Fy (a path with an encoded "?") and /x?y (a path and a query) are
    different requests: a signature for one does not open the other."""
    seen, captured = [], {}

    def logic(req):
        seen.append(req.target)
        return 200, [("Content-Type", "text/plain")], [b"ok"]

    inner = ib.trusted(make_app(remote.kind, logic), KEY)

    def spy(environ, start_response):
        captured.update({k: v for k, v in environ.items() if k.startswith("HTTP_INPROC_")})
        return inner(environ, start_response)

    remote.app = spy
    with ib.OpenerFactory() as factory:
        factory.mount("api", remote.url, key=KEY)
        with _factory_opener(factory, source="agents").open("inproc://api/x%3Fy",
                                                            timeout=WAIT) as resp:
            assert resp.read() == b"ok"
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(remote.url).netloc, timeout=WAIT)
    try:
        conn.request("GET", "/x?y", headers={name[5:].replace("_", "-"): value
                                             for name, value in captured.items()})
        assert conn.getresponse().status == 401
    finally:
        conn.close()
    assert len(seen) == 1


def test_remote_never_sends_an_underscore_spelling_of_inproc_headers(remote):
    """A WSGI server reads Inproc_Source as HTTP_INPROC_SOURCE: that spelling
    is stripped as well, with and without a key."""
    wire = []

    def app(environ, start_response):
        wire.append(sorted(k for k in environ if "INPROC" in k))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    remote.app = app
    for key in (KEY, None):
        with ib.OpenerFactory() as factory:
            factory.mount("api", remote.url, key=key)
            req = urllib.request.Request("inproc://api/x", headers={"Inproc_Source": "admin"})
            with _factory_opener(factory).open(req, timeout=WAIT) as resp:
                assert resp.read() == b"ok"
    assert wire == [["HTTP_INPROC_SIGNATURE", "HTTP_INPROC_TIME"], []]


@pytest.mark.parametrize("url", ["http://user:secret@127.0.0.1:9/base", "http://127.0.0.1:abc/"])
def test_remote_mount_refuses_userinfo_and_a_bad_port(url):
    with pytest.raises(ValueError) as info:
        ib.InProcHandler().mount("api", url, key=KEY)
    assert "secret" not in str(info.value)


def test_intercept_refuses_a_network_redirect_to_an_encoded_mounted_host():
    """Location: http://api%2Einternal/ is the mounted host once urllib
    unquotes it: refused as the plain spelling is."""
    class Redirector(QuietHandler):
        def do_GET(self):
            _respond(self, status=302, headers=[("Location", "http://api%2Einternal/secret"),
                                                ("Content-Type", "text/plain")])

    with _icpt_loopback(Redirector) as server:
        with _icpt_block({_ICPT_HOST: make_app("wsgi-inline", _never_called)}), _http_error(302):
            _net_opener().open(server.base + "/", timeout=WAIT)


def test_intercept_does_not_follow_a_remote_mounts_redirect(remote):
    """Under intercept() a remote mount's 3xx reaches the caller as it came,
    never followed into another mounted host."""
    remote.app = make_app(remote.kind, lambda req: (302, [
        ("Location", "http://inner.internal/admin"), ("Content-Type", "text/plain")], []))
    with _icpt_block({"far.internal": remote.url,
                      "inner.internal": make_app("wsgi-inline", _never_called)}):
        with _http_error(302):
            _net_opener().open("http://far.internal/x", timeout=WAIT)


@pytest.mark.parametrize("framing", ["length", "close"])
def test_intercept_http_client_cut_from_a_handler_raises(framing):
    """A Fault cut on the byte-for-byte path (http.client to a handler
    class) ends in an error, never a clean short body."""
    body = b"0123456789" * 10

    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1" if framing == "length" else "HTTP/1.0"

        def do_GET(self):
            self.send_response(200)
            if framing == "length":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 10):
                self.wfile.write(body[i:i + 10])
                self.wfile.flush()

    with _icpt_block({}) as bridge:
        bridge.mount(_ICPT_HOST, Handler, fault=ib.Fault(cut_after=15))
        with contextlib.closing(http.client.HTTPConnection(_ICPT_HOST, timeout=WAIT)) as conn:
            conn.request("GET", "/")
            resp = conn.getresponse()
            got = b""
            with pytest.raises(ALLOWED):
                for piece in iter(lambda: resp.read(7), b""):
                    got += piece
            assert got == body[:15]  # every byte before the cut, then the error


@pytest.mark.parametrize("style", ["read()", "read(7)", "readinto(7)"])
def test_intercept_http_client_cut_delivers_every_byte_before_the_error(app_kind, style):
    """Plain http.client under intercept gets every byte a Fault's cut lets
    through, then IncompleteRead -- as the urllib path has it, on every kind
    (a buffered read that gathered bytes when the cut came used to drop them)."""
    body = b"0123456789" * 10
    logic = lambda req: (200, [("Content-Type", "text/plain"),  # noqa: E731
                               ("Content-Length", str(len(body)))],
                         [body[i:i + 10] for i in range(0, len(body), 10)])
    with _icpt_block({}) as bridge:
        bridge.mount(_ICPT_HOST, make_app(app_kind, logic), fault=ib.Fault(cut_after=15))
        conn = http.client.HTTPConnection(_ICPT_HOST, timeout=KIND_TIMEOUT[app_kind])
        with contextlib.closing(conn):
            conn.request("GET", "/")
            resp = conn.getresponse()
            got = bytearray()
            with pytest.raises(http.client.IncompleteRead) as info:
                if style == "read()":
                    resp.read()
                while style == "read(7)":
                    piece = resp.read(7)
                    assert piece, "a clean end after %r" % bytes(got)
                    got += piece
                while style == "readinto(7)":
                    buffer = bytearray(7)
                    n = resp.readinto(buffer)
                    assert n, "a clean end after %r" % bytes(got)
                    got += buffer[:n]
            if style == "read()":
                # (3.9's http.client gathers a body in a loop of reads and drops
                # what it had when one raises: the error still comes.)
                got = info.value.partial
                if sys.version_info[:2] == (3, 9):
                    got = got or body[:15]
            assert bytes(got) == body[:15]


@pytest.mark.parametrize("app_kind", ["handler", "wsgi-worker"])
def test_intercept_http_client_closed_mid_request_frees_the_app(app_kind):
    """A client that closes its connection halfway through a body: the app's
    read fails (as over TCP), and nothing is left in flight."""
    read, done = {}, threading.Event()

    def logic(req):
        try:
            while req.read(65536):
                pass
            read["result"] = "whole"
        except OSError as exc:
            read["result"] = type(exc).__name__
        finally:
            done.set()
        return 200, [("Content-Type", "text/plain")], [b"late"]

    with _icpt_block({_ICPT_HOST: make_app(app_kind, logic, stream=True)}, network=False) as bridge:
        conn = http.client.HTTPConnection(_ICPT_HOST, timeout=WAIT)
        conn.putrequest("POST", "/")
        conn.putheader("Content-Length", "100000")
        conn.endheaders()
        conn.send(b"x" * 70000)
        conn.close()
        assert done.wait(WAIT), "the app never learned its client left"
        assert read["result"] == "ConnectionAbortedError"
        assert bridge.drain(WAIT) == 0


def test_intercept_connection_outliving_its_block_is_reset():
    """A connection made inside a block and used after it: reset, not served
    by the block's closed bridge, not sent to the network."""
    with contextlib.closing(http.client.HTTPConnection(_ICPT_HOST, timeout=WAIT)) as conn:
        with _icpt_block({_ICPT_HOST: make_app("wsgi-inline", _answer(body=b"ok"))}, network=False):
            conn.request("GET", "/1")
            assert conn.getresponse().read() == b"ok"
        with pytest.raises(ConnectionResetError):
            conn.request("GET", "/2")
            conn.getresponse()


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


def test_pipe_read_and_write_timeouts_raise_socket_timeout():
    pipe = ib.BodyPipe(read_timeout=0.05)
    with pytest.raises(socket.timeout):
        pipe.read(1)
    with pytest.raises(OSError):
        pipe.read(1)  # then refuses
    pipe.close()
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


def test_selftest_runs_as_a_module():
    done = _run_module()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == "inproc_bridge %s self-test" % ib.__version__
    assert lines[-1] == "%d passed, 0 failed" % len(ib._SELFTEST_CHECKS)
    help_run = _run_module("--help")
    assert help_run.returncode == 0
    assert "--quiet" in help_run.stdout and "--verbose" in help_run.stdout


def test_selftest_passes(capsys):
    status, lines = _selftest_output(capsys)
    assert status == 0
    checks = _check_lines(lines)
    assert checks == ["ok    " + name for name, _ in ib._SELFTEST_CHECKS]
    assert lines[-1] == "%d passed, 0 failed" % len(checks)


def test_selftest_header_says_what_it_tests(capsys):
    _, lines = _selftest_output(capsys)
    assert lines[0] == "inproc_bridge %s self-test" % ib.__version__
    assert lines[1] == "module: " + os.path.abspath(ib.__file__)
    assert lines[2].startswith("python: %s %s" % (platform.python_implementation(),
                                                  platform.python_version()))
    assert sys.executable in lines[2]
    header = lines[:lines.index(_check_lines(lines)[0])]
    assert header == ib._selftest_header()
    assert all(line.startswith(("inproc_bridge ", "module: ", "python: ", "note: "))
               for line in header)


def test_selftest_header_notes_a_checkout_that_shadows_another_copy(tmp_path):
    # A checkout in the current directory shadows the copy on PYTHONPATH (as
    # one would shadow an installed copy): the header must say so.
    here = tmp_path / "checkout"
    here.mkdir()
    with open(ib.__file__, encoding="utf-8") as f:
        (here / "inproc_bridge.py").write_text(f.read(), encoding="utf-8")
    done = _run_module("-q", cwd=str(here))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["%d passed, 0 failed" % len(ib._SELFTEST_CHECKS)]
    show = "import inproc_bridge as m; print(m.__file__); print(*m._selftest_header(), sep='\\n')"
    note = subprocess.run(
        [sys.executable, "-c", show],
        cwd=str(here), capture_output=True, text=True, timeout=120, env=_module_env())
    tested, *header = note.stdout.splitlines()
    assert os.path.realpath(tested) == os.path.realpath(str(here / "inproc_bridge.py"))
    assert header[-1].startswith("note: not the copy that `import inproc_bridge` finds ")
    assert os.path.abspath(ib.__file__) in header[-1]
    # From elsewhere, the copy on PYTHONPATH is the one tested, with no note.
    done = _run_module(cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not any(line.startswith("note: ") for line in done.stdout.splitlines())


def test_selftest_quiet_prints_only_the_final_line(capsys):
    status, lines = _selftest_output(capsys, "-q")
    assert status == 0
    assert lines == ["%d passed, 0 failed" % len(ib._SELFTEST_CHECKS)]
    status, long_form = _selftest_output(capsys, "--quiet")
    assert (status, long_form) == (0, lines)


def test_selftest_verbose_adds_timings_and_details(capsys):
    status, lines = _selftest_output(capsys, "-v")
    assert status == 0
    checks = _check_lines(lines)
    assert len(checks) == len(ib._SELFTEST_CHECKS)
    for (name, _), line in zip(ib._SELFTEST_CHECKS, checks):
        assert line.startswith("ok    " + name + "  (") and line.endswith(" ms)")
        details = lines[lines.index(line) + 1]
        assert details.startswith("      ") and details.strip()
    assert lines[-2].startswith("%d checks in " % len(checks))
    assert lines[-1] == "%d passed, 0 failed" % len(checks)
    with pytest.raises(SystemExit):
        ib.main(["-q", "-v"])  # one or the other
    capsys.readouterr()


def test_selftest_reports_expected_and_got(capsys, monkeypatch):
    checks = list(ib._SELFTEST_CHECKS[:2])
    checks.insert(1, _failing())
    monkeypatch.setattr(ib, "_SELFTEST_CHECKS", checks)
    status, lines = _selftest_output(capsys)
    assert status == 1
    at = lines.index("FAIL  a check that fails on purpose")
    assert lines[at + 1] == ("      what the failing check looked at: expected ('status', 200), "
                             "got ('status', 500)")
    assert lines[at + 2] == "ok    " + checks[2][0]
    assert lines[-1] == "2 passed, 1 failed"


def test_selftest_quiet_shows_the_header_and_the_failures(capsys, monkeypatch):
    monkeypatch.setattr(ib, "_SELFTEST_CHECKS", [ib._SELFTEST_CHECKS[0], _failing()])
    status, lines = _selftest_output(capsys, "-q")
    assert status == 1
    header = ib._selftest_header()
    assert lines == [
        *header,
        "FAIL  a check that fails on purpose",
        "      what the failing check looked at: expected ('status', 200), got ('status', 500)",
        "1 passed, 1 failed",
    ]


def test_selftest_reports_an_unexpected_exception(capsys, monkeypatch):
    def check(run):
        raise ValueError("not what a check should raise")

    monkeypatch.setattr(ib, "_SELFTEST_CHECKS", [("a check that raises", check)])
    status, lines = _selftest_output(capsys)
    assert status == 1
    assert lines[-3:] == [
        "FAIL  a check that raises",
        "      expected no exception, got ValueError: not what a check should raise",
        "0 passed, 1 failed",
    ]
    status, lines = _selftest_output(capsys, "-v")  # and the traceback with -v
    assert status == 1
    assert "      Traceback (most recent call last):" in lines
    assert "      ValueError: not what a check should raise" in lines


def test_selftest_checks_are_quick_and_bounded():
    results = ib._selftest()
    assert [r.failure for r in results] == [None] * len(ib._SELFTEST_CHECKS)
    assert sum(r.seconds for r in results) < 5.0, [(r.name, r.seconds) for r in results]


@pytest.mark.parametrize("fail", [False, True], ids=["passing", "failing"])
def test_selftest_exit_status_survives_a_closed_stdout(monkeypatch, fail):
    checks = [ib._SELFTEST_CHECKS[0]] + ([_failing()] if fail else [])
    monkeypatch.setattr(ib, "_SELFTEST_CHECKS", checks)
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert ib.main([]) == (1 if fail else 0)


def test_selftest_head_1_prints_no_traceback():
    # What `python -m inproc_bridge | head -1` does: read one line, close the pipe.
    child = subprocess.Popen([sys.executable, "-m", "inproc_bridge"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=_module_env())
    try:
        first = child.stdout.readline()
        child.stdout.close()
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert first == b"inproc_bridge %s self-test\n" % ib.__version__.encode()
    assert err == b""
    assert child.returncode == 0  # the checks' verdict, not the pipe's


@pytest.mark.skipif(sys.platform == "win32", reason="needs bash and head")
def test_selftest_piped_to_head_in_a_shell():
    script = '"$0" -m inproc_bridge | head -1; echo "status ${PIPESTATUS[0]}"'
    done = subprocess.run(["bash", "-c", script, sys.executable], capture_output=True,
                          text=True, timeout=120, env=_module_env())
    assert done.stderr == ""
    assert done.stdout.splitlines() == ["inproc_bridge %s self-test" % ib.__version__, "status 0"]


# ---------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", _readme_examples())
def test_readme_example_runs(source):
    exec(compile(source, "README.rst", "exec"), {"__name__": "readme_example"})


def test_readme_has_examples():
    assert len(_readme_examples()) >= 5


# ---------------------------------------------------------------------------
# Real frameworks (optional)
# ---------------------------------------------------------------------------


@pytest.mark.optional
def test_asgi_serves_a_starlette_app():
    _optional("starlette")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    events = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        events.append("startup")
        yield {"greeting": "hello"}
        events.append("shutdown")

    async def hello(request):
        body = await request.body()
        return JSONResponse({"greeting": request.state.greeting,
                             "path": request.url.path,
                             "body": body.decode(),
                             "source": ib.current_source()})

    async def stream(request):
        async def gen():
            for i in range(3):
                yield "data: %d\n\n" % i

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/hello", hello, methods=["POST"]), Route("/sse", stream)],
                    lifespan=lifespan)
    with ib.OpenerFactory({"api": app}) as factory:
        assert events == ["startup"]
        opener = factory.opener_for(source="tests")
        with opener.open("inproc://api/hello", data=b"hi", timeout=WAIT) as resp:
            import json

            assert json.loads(resp.read()) == {"greeting": "hello", "path": "/hello",
                                               "body": "hi", "source": "tests"}
        with opener.open("inproc://api/sse", timeout=WAIT) as resp:
            assert resp.getheader("content-type").startswith("text/event-stream")
            assert resp.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        with _http_error(404):
            opener.open("inproc://api/nowhere", timeout=WAIT)
    assert events == ["startup", "shutdown"]


@pytest.mark.optional
@pytest.mark.parametrize("protocol", ["h11", "httptools"])
def test_uvicorn_and_in_process_asgi_show_the_same_response(protocol):
    _optional("uvicorn")
    if protocol == "httptools":
        _optional("httptools")
        # h11 refuses values with leading or trailing whitespace; httptools sends them.
        headers = _TRICKY_HEADERS + _TAB_HEADERS
    else:
        headers = [("X-Obs", "caf\xe9"), ("X-Empty", ""), ("X-Inner", "a  b\tc"),
                   ("X-Many", "one"), ("X-Many", "two"),
                   ("Set-Cookie", "csrftoken=abc123; Path=/; SameSite=Lax"),
                   ("Set-Cookie", "sessionid=s3cr3t; HttpOnly; Path=/")]
    raw = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*raw, (b"content-type", b"text/plain")]})
        for part in (b"one\n", b"two\n"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with _uvicorn_loopback(app, protocol) as base:
        wire = _seen(_jar_opener(), base + "/x?y=1")
    with Bridge({"app": ib.ASGIApp(app, lifespan=False)}) as (_, bridge):
        got = _seen(_jar_opener(bridge), "inproc://app/x?y=1")
    assert got == wire
    assert got["body"] == b"one\ntwo\n"
    assert got["cookies"] == [("csrftoken", "abc123"), ("sessionid", "s3cr3t")]


@pytest.mark.optional
@pytest.mark.parametrize("kind", ["wsgi-inline", "wsgi-worker"])
def test_django_wsgi_set_cookie_over_wsgiref_and_in_process(kind):
    _optional("django")
    from django.http import JsonResponse
    from django.urls import path

    def view(request):
        response = JsonResponse({"method": request.method, "path": request.path,
                                 "csrf": request.COOKIES.get("csrftoken")})
        response.set_cookie("csrftoken", "abc123", samesite="Lax")  # a session cookie
        response["X-Frame"] = "DENY"
        return response

    wire, got = _wsgi_seen(_django([path("api/", view)])[0], "/api/", kind, 2)
    assert got == wire
    # Django writes " csrftoken=..." (c.output(header="")); the wire drops the space.
    assert got[0]["getheader"]["set-cookie"] == "csrftoken=abc123; Path=/; SameSite=Lax"
    assert got[0]["cookies"] == [("csrftoken", "abc123")]
    assert json.loads(got[1]["body"]) == {"method": "GET", "path": "/api/", "csrf": "abc123"}


@pytest.mark.optional
def test_django_asgi_handler_in_process_matches_its_wsgi_handler_over_wsgiref():
    _optional("django")
    from django.http import JsonResponse
    from django.urls import path

    async def view(request):
        response = JsonResponse({"method": request.method, "path": request.path,
                                 "csrf": request.COOKIES.get("csrftoken")})
        response.set_cookie("csrftoken", "abc123", samesite="Lax")
        return response

    wsgi, asgi = _django([path("api/", view)])
    ended = threading.Semaphore(0)

    async def django_asgi(scope, receive, send):
        try:
            await asgi(scope, receive, send)
        finally:
            if scope["type"] == "http":
                ended.release()

    wire_opener = _jar_opener()
    with _loopback(wsgi) as base:
        wire = [_seen(wire_opener, base + "/api/"), _seen(wire_opener, base + "/api/")]
    with Bridge({"django": django_asgi}) as (_, bridge):
        opener = _jar_opener(bridge)
        got = []
        for _ in range(2):
            got.append(_seen(opener, "inproc://django/api/"))
            # Django goes on after the response (response.close(), closing its body file):
            # the bridge's close() would cancel that and leak the file (ResourceWarning).
            assert ended.acquire(timeout=WAIT)
    for response in got + wire:  # wsgiref adds a Content-Length that Django's ASGI leaves out
        response["headers"] = [(n, v) for n, v in response["headers"] if n != "Content-Length"]
        response["info"] = [(n, v) for n, v in response["info"] if n != "Content-Length"]
        response["getheader"].pop("content-length", None)
    assert got == wire
    assert got[0]["cookies"] == [("csrftoken", "abc123")]
    assert json.loads(got[1]["body"])["csrf"] == "abc123"


@pytest.mark.optional
@pytest.mark.parametrize("kind", ["wsgi-inline", "wsgi-worker"])
def test_flask_cookie_and_streamed_response_over_wsgiref_and_in_process(kind):
    flask = _optional("flask")
    app = flask.Flask("inproc_bridge_tests")

    @app.route("/stream")
    def stream():
        theme = flask.request.cookies.get("theme", "none")

        @flask.stream_with_context
        def events():
            for n in range(3):
                yield "data: %d %s %s\n\n" % (n, flask.request.path, theme)

        response = flask.Response(events(), mimetype="text/event-stream")
        response.set_cookie("theme", "dark", httponly=True)
        return response

    wire, got = _wsgi_seen(app, "/stream", kind, 2)
    assert got == wire
    assert got[0]["cookies"] == [("theme", "dark")]
    assert got[1]["body"] == b"".join(b"data: %d /stream dark\n\n" % n for n in range(3))


@pytest.mark.optional
def test_fastapi_json_post_needs_its_content_type_in_process_as_over_uvicorn():
    fastapi = _optional("fastapi")
    pydantic = _optional("pydantic")

    class Item(pydantic.BaseModel):
        name: str
        price: float

    api = fastapi.FastAPI()

    @api.post("/items")
    async def create(item: Item):
        return {"name": item.name, "price": item.price, "source": ib.current_source()}

    payload = json.dumps({"name": "tea", "price": 2.5}).encode()
    json_type = {"Content-Type": "application/json"}

    def both(opener, url, timeout=WAIT):
        # Without the header urllib sends Content-Type: application/x-www-form-urlencoded,
        # so FastAPI does not parse the body as JSON: 422, over the wire as in-process.
        return [_seen(opener, url, timeout, data=payload, headers=json_type),
                _seen(opener, url, timeout, data=payload)]

    with _uvicorn_loopback(api) as base:
        wire = both(_jar_opener(), base + "/items")
    with ib.OpenerFactory({"api": api}) as factory:
        got = both(factory.opener_for(source="tests"), "inproc://api/items")
    assert got[0]["status"] == 200
    assert json.loads(got[0]["body"]) == {"name": "tea", "price": 2.5, "source": "tests"}
    assert json.loads(wire[0]["body"]) == {"name": "tea", "price": 2.5, "source": None}
    assert got[1]["status"] == wire[1]["status"] == 422
    assert json.loads(got[1]["body"]) == json.loads(wire[1]["body"])
    for g, w in zip(got, wire):
        assert g["reason"] == w["reason"]
        assert g["getheader"]["content-type"] == w["getheader"]["content-type"] == (
            "application/json")


@pytest.mark.optional
@pytest.mark.parametrize("kind", ["wsgi-inline", "wsgi-worker"])
def test_falcon_json_and_header_over_wsgiref_and_in_process(kind):
    falcon = _optional("falcon")

    class Things:
        def on_get(self, req, resp):
            resp.media = {"things": [1, 2], "q": req.get_param("q")}
            resp.set_header("X-Falcon", "caf\xe9")

    app = falcon.App()
    app.add_route("/things", Things())
    (wire,), (got,) = _wsgi_seen(app, "/things?q=x", kind)
    assert got == wire
    assert json.loads(got["body"]) == {"things": [1, 2], "q": "x"}
    assert got["getheader"]["x-falcon"] == "caf\xe9"


@pytest.mark.optional
@pytest.mark.parametrize("kind", ["wsgi-inline", "wsgi-worker"])
def test_bottle_json_and_header_over_wsgiref_and_in_process(kind):
    bottle = _optional("bottle")
    app = bottle.Bottle()

    @app.route("/hello/<name>")
    def hello(name):
        bottle.response.set_header("X-Bottle", " yes")
        return {"hello": name}

    (wire,), (got,) = _wsgi_seen(app, "/hello/world", kind)
    assert got == wire
    assert json.loads(got["body"]) == {"hello": "world"}
    assert got["getheader"]["x-bottle"] == "yes"


# ---------------------------------------------------------------------------
# Reliability: leaks, bounded memory, load, randomized faults
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("app_mode", ["waits", "floods"])
@pytest.mark.parametrize("how", ["drop", "close"])
@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_leak_abandoned_response_releases_app(app_kind, how, app_mode, worker_pool):
    probe = Probe()
    body = _abandon_body(app_kind, probe, app_mode == "floods")
    opener = _opener({"api": make_app(app_kind, _streamed(body), probe)})
    pipes_before = _live(ib.BodyPipe)

    def run():
        resp = opener.open("inproc://api/stream", timeout=_timeout_for(app_kind))
        assert resp.read(len(FIRST)) == FIRST
        if how == "close":
            resp.close()
            del resp
            gc.collect()
            return
        with pytest.warns(ResourceWarning, match="unclosed"):
            del resp
            gc.collect()

    _call(run)
    assert probe.wait_finished(), "the app was not released"
    if app_kind != "wsgi-inline" and app_mode == "waits":
        assert probe.details("cancelled") == [True], "the app never saw cancelled() set"
    assert "survived-write" not in [k for k, _ in probe.events], (
        "a write after the caller left succeeded")
    if app_kind == "handler":
        assert probe.details("write-error") == [BrokenPipeError]
    # The body was closed (for WSGI probe.finished counts the result's
    # close()): its generator saw GeneratorExit, with cancelled() set.
    assert probe.details("generator-exit") == [True]
    _assert_threads_back(worker_pool)
    assert probe.finished == 1, "close() called %d times" % probe.finished
    assert _live(ib.BodyPipe) <= pipes_before, "a BodyPipe outlived its response"


def test_leak_abandoned_wsgi_write_callable_raises_broken_pipe(worker_pool):
    probe = Probe()

    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(FIRST)
        probe.note("cancelled", ib.cancelled().wait(WAIT))
        try:
            write(b"next|")
        except BaseException as exc:
            probe.note("write-error", type(exc))
            raise
        return []

    opener = _opener({"api": _tracked_wsgi(app, probe)})

    def run():
        resp = opener.open("inproc://api/", timeout=5)
        assert resp.read(len(FIRST)) == FIRST
        with pytest.warns(ResourceWarning, match="unclosed"):
            del resp
            gc.collect()

    _call(run)
    assert probe.wait_finished()
    assert probe.details("cancelled") == [True]
    errors = probe.details("write-error")
    assert errors == [BrokenPipeError], errors
    _assert_threads_back(worker_pool)


def test_leak_dropped_httperror_releases_app(app_kind, worker_pool):
    probe = Probe()

    def logic(req):
        def body():
            yield FIRST
            if app_kind != "wsgi-inline":
                probe.note("cancelled", ib.cancelled().wait(WAIT))
            yield b"more"

        return 404, [("Content-Type", "text/plain")], body()

    bridge = Bridge({"api": make_app(app_kind, logic, probe)})
    opener = bridge.opener

    def run():
        # An HTTPError wraps its response in urllib's addinfourl, whose
        # finalizer closes it: dropped unclosed, it releases the app (with or
        # without a ResourceWarning, as for http://).
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                opener.open("inproc://api/missing", timeout=_timeout_for(app_kind))
            except urllib.error.HTTPError as err:
                assert err.code == 404
                assert err.read(len(FIRST)) == FIRST
            else:
                pytest.fail("no HTTPError")
            gc.collect()
        assert all(issubclass(w.category, ResourceWarning) for w in seen), seen

    with bridge:
        _call(run)
        assert probe.wait_finished()
    if app_kind != "wsgi-inline":
        assert probe.details("cancelled") == [True]
    _assert_threads_back(worker_pool)


def test_leak_abandoned_burst_returns_to_baseline(app_kind, worker_pool):
    """Open ``burst`` streams at once, read a little of each and drop them
    all unclosed: every app is released, memory and threads return (ASGI:
    the loop's task set drains; the app streams until receive() says the
    caller left, as an SSE app does)."""
    burst = 200
    probe = Probe()
    if app_kind == "asgi":

        @_probed(probe)
        async def app(scope, receive, send):
            await receive()
            await _send(send, FIRST, more=True)
            probe.tally("left", (await receive())["type"])

    else:
        app = make_app(app_kind, _streamed(_abandon_body(app_kind, probe)), probe)
    bridge = Bridge({"api": app})
    timeout = 5 if app_kind == "asgi" else _timeout_for(app_kind)

    def one_closed():
        with bridge.opener.open("inproc://api/", timeout=timeout) as resp:
            assert resp.read(len(FIRST)) == FIRST

    def abandon_burst():
        """How many ran at once (ASGI: tasks on the loop) and how many tasks are left."""
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            resps = [bridge.opener.open("inproc://api/", timeout=timeout) for _ in range(burst)]
            live = _loop_tasks(probe.loop) if app_kind == "asgi" else None
            if app_kind not in ("wsgi-inline", "asgi"):
                assert len(_worker_threads()) >= burst
            for resp in resps:
                assert resp.read(len(FIRST)) == FIRST
            del resps, resp
            gc.collect()
        unclosed = [w for w in seen if issubclass(w.category, ResourceWarning)]
        assert len(unclosed) == burst, [str(w.message) for w in seen][:5]
        del seen, unclosed
        return live, _tasks_drained(probe)

    def run():
        # Warm-up, untraced: lazily built module state; on ASGI one burst of
        # the same size, so that what keeps its high-water size (the loop's
        # task set, asyncio's weak set of all tasks, the ready deque) is not
        # counted.
        if app_kind == "asgi":
            assert abandon_burst() == (burst, 0)
            warm = burst
        else:
            for _ in range(5):
                one_closed()
            warm = 5
        assert probe.wait_finished(warm)
        assert _drain_workers()

        def measured():
            live, left = abandon_burst()
            assert probe.wait_finished(warm + burst), "%d of %d apps released" % (
                probe.finished - warm, burst)
            assert _drain_workers()
            return live, left

        (live, left), grown = _traced(measured)
        return live, left, grown

    with bridge:
        live, left, grown = _call(run, timeout=60)
    print("\nleak[%s] %d abandoned: memory %+d bytes" % (app_kind, burst, grown))
    _assert_threads_back(worker_pool)
    assert left == 0, "%d request tasks left on the loop" % left
    assert not bridge.new_threads(), "close() left a thread: %r" % bridge.new_threads(0)
    if app_kind == "asgi":
        assert live == burst, "%d of %d streams were running at once" % (live, burst)
        assert probe.tallies == {("left", "http.disconnect"): 2 * burst}, probe.tallies
    bound = LEAK_BOUND if app_kind == "asgi" else 256 * 1024
    assert grown < bound, "memory grew by %d bytes after %d abandoned responses" % (grown, burst)


@pytest.mark.parametrize("app_kind", HEAVY_ON_SYNC_KINDS)
def test_leak_sequential_requests_return_to_baseline(app_kind, worker_pool):
    count = 2000 if app_kind == "asgi" else 5000
    probe = Probe()
    parts = [b"alpha|", b"beta|" * 20, b"gamma"]
    bridge = Bridge({"api": make_app(app_kind, _streamed(lambda target: parts), probe)})
    timeout = 5 if app_kind == "asgi" else _timeout_for(app_kind)
    expected = b"".join(parts)

    def one():
        with bridge.opener.open("inproc://api/seq", timeout=timeout) as resp:
            assert resp.read() == expected

    def run():
        for _ in range(50):
            one()
        assert _tasks_drained(probe) == 0

        def measured():
            for _ in range(count):
                one()
            assert probe.wait_finished(50 + count)
            assert _drain_workers()
            return _tasks_drained(probe)

        return _traced(measured)

    start = time.monotonic()
    with bridge:
        left, grown = _call(run, timeout=90)
    print("\nleak[%s] %d sequential: memory %+d bytes, %.2f s"
          % (app_kind, count, grown, time.monotonic() - start))
    assert left == 0, "%d request tasks left on the loop" % left
    _assert_threads_back(worker_pool)
    assert not bridge.new_threads(), "close() left a thread: %r" % bridge.new_threads(0)
    assert grown < LEAK_BOUND, "memory grew by %d bytes over %d requests" % (grown, count)


@pytest.mark.heavy
def test_memory_slow_reader_bounds_streamed_response(app_kind, worker_pool):
    probe, sent = Probe(), {}
    timeout = 5 if app_kind == "asgi" else _timeout_for(app_kind)
    app = make_app(app_kind, _streamed(lambda target: _counted_chunks(sent)), probe)
    with Bridge({"api": app}) as bridge:
        start = time.monotonic()
        size, crc, peak = _call(lambda: _slow_read_peak(bridge.opener, timeout), timeout=120)
        elapsed = time.monotonic() - start
        assert _tasks_drained(probe) == 0
    print("\nmemory[%s] response %d MiB: peak %.2f MiB in flight, %.1f s"
          % (app_kind, BIG // MIB, peak / MIB, elapsed))
    assert (size, crc) == (sent["size"], sent["crc"]) and size == BIG
    assert peak < MEMORY_BOUND, "%d bytes in flight" % peak
    assert probe.wait_finished()


@pytest.mark.heavy
def test_memory_slow_app_bounds_request_body(app_kind, worker_pool):
    probe = Probe()
    received = {"crc": 0, "size": 0, "messages": 0}

    def sink(req):
        if app_kind == "handler":
            assert req.headers["Transfer-Encoding"] == "chunked"
        while True:
            data = req.read(PIECE)
            if not data:
                break
            received["crc"] = zlib.crc32(data, received["crc"])
            received["size"] += len(data)
            time.sleep(0)  # a slow app: it yields after every piece
        received["messages"] = req.messages
        return 200, [("Content-Type", "text/plain")], [b"%d:%d" % (received["size"],
                                                                  received["crc"])]

    bridge = Bridge({"api": make_app(app_kind, sink, probe, stream=True)})
    timeout = 5 if app_kind == "asgi" else _timeout_for(app_kind)
    sent = {}

    def run():
        def upload():
            req = urllib.request.Request("inproc://api/upload", data=_counted_chunks(sent),
                                         method="POST")
            with bridge.opener.open(req, timeout=timeout) as resp:
                return resp.read()

        return _traced(upload, peak=True)

    start = time.monotonic()
    with bridge:
        answer, peak = _call(run, timeout=120)
        elapsed = time.monotonic() - start
        assert _tasks_drained(probe) == 0
    print("\nmemory[%s] request %d MiB: peak %.2f MiB in flight, %d messages, %.1f s"
          % (app_kind, BIG // MIB, peak / MIB, received["messages"], elapsed))
    assert sent["size"] == BIG
    assert answer == b"%d:%d" % (sent["size"], sent["crc"])
    if app_kind == "asgi":
        assert received["messages"] > 1
    assert peak < MEMORY_BOUND, "%d bytes in flight" % peak
    assert probe.wait_finished()


@pytest.mark.parametrize("app_kind", HEAVY_ON_SYNC_KINDS)
def test_load_simultaneous_streams(app_kind, worker_pool):
    """1000 streams open at once (500 on the one ASGI loop), each held after
    its first part until every one is open and its first part read; then 8
    readers take a piece (read1) from each of theirs in turn: every stream
    gets exactly its bytes, all ran at once, nothing is left running."""
    asgi = app_kind == "asgi"
    streams, readers = (500 if asgi else 1000), 8
    probe, release, gate = Probe(), threading.Event(), Baton()
    if asgi:

        @_probed(probe)
        async def app(scope, receive, send):
            await receive()
            first, *rest = _load_parts(int(scope["path"].rsplit("/", 1)[1]))
            await _send(send, first, more=True)
            await gate.take()  # every stream is open before any goes on
            probe.note("released", True)
            for part in rest:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
    else:

        def body(target):
            first, *rest = _load_parts(int(target.rsplit("/", 1)[1]))
            yield first
            # Every stream stays open (its worker blocked) until all are open.
            probe.note("released", release.wait(WAIT * 3))
            yield from rest

        app = make_app(app_kind, _streamed(body), probe)
    timeout = WAIT if asgi else _timeout_for(app_kind)

    def release_all():
        release.set()
        gate.give(math.inf)

    with Bridge({"api": app}) as bridge:

        def run():
            resps = []
            try:
                for i in range(streams):
                    resps.append(bridge.opener.open("inproc://api/s/%d" % i, timeout=timeout))
                live = _loop_tasks(probe.loop) if asgi else len(_worker_threads())
                for i, resp in enumerate(resps):
                    first = _load_parts(i)[0]
                    assert resp.read(len(first)) == first
                release_all()
                bad = []

                def reader(k):
                    def read():
                        mine = list(range(k, streams, readers))
                        got = {i: bytearray() for i in mine}
                        # Round robin: a piece from each stream in turn.
                        while mine:
                            for i in list(mine):
                                data = resps[i].read1(4096)
                                if data:
                                    got[i] += data
                                else:
                                    mine.remove(i)
                        for i, data in got.items():
                            if bytes(data) != b"".join(_load_parts(i)[1:]):
                                bad.append(i)

                    return read

                _run_threads([reader(k) for k in range(readers)], timeout=60)
                return live, bad
            finally:
                release_all()
                for resp in resps:
                    resp.close()

        start = time.monotonic()
        live, bad = _call(run, timeout=90)
        elapsed = time.monotonic() - start
        assert probe.wait_finished(streams)
        left = _tasks_drained(probe)
    print("\nload[%s] %d open streams, %d readers: %.2f s" % (app_kind, streams, readers, elapsed))
    if asgi:
        assert live == streams, "%d of %d streams were running at once" % (live, streams)
    elif app_kind != "wsgi-inline":
        assert live >= streams, "%d workers for %d streams" % (live, streams)
    assert not bad, "streams with wrong bytes: %r" % bad[:10]
    assert probe.details("released") == [True] * streams
    assert left == 0
    if asgi:
        assert not bridge.new_threads(), "close() left a thread: %r" % bridge.new_threads(0)
    _assert_threads_back(worker_pool)


# Not ASGI, as test_nested_calls_from_inside_an_app.
@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_load_nested_calls_do_not_deadlock(app_kind, worker_pool):
    depth, threads = 20, 8
    probe, holder = Probe(), {}
    timeout = _timeout_for(app_kind)

    def answer(target):
        level, tag = target.strip("/").split("/")
        level = int(level)
        if level == depth:
            return b"leaf-" + tag.encode()
        url = "inproc://api/%d/%s" % (level + 1, tag)
        with holder["opener"].open(url, timeout=timeout) as resp:
            return b"%d>" % level + resp.read()

    def logic(req):
        probe.start()

        def body():  # the nested call runs as the caller pulls
            try:
                yield answer(req.target)
            finally:
                probe.finish()

        return 200, [("Content-Type", "text/plain")], body()

    holder["opener"] = _opener({"api": make_app(app_kind, logic)})

    def client(k):
        def run():
            with holder["opener"].open("inproc://api/0/t%d" % k, timeout=timeout) as resp:
                data = resp.read()
            assert data == b"".join(b"%d>" % i for i in range(depth)) + b"leaf-t%d" % k

        return run

    _run_threads([client(k) for k in range(threads)], timeout=60)
    assert probe.wait_finished(threads * (depth + 1))
    _assert_threads_back(worker_pool)


def test_load_remount_while_requests_fly(app_kind, worker_pool):
    """Mount A, replace it by B, unmount, ... while 4 clients send requests:
    each request gets all of A's or all of B's body, or a BridgeError
    naming the mount -- nothing else.  The swapper takes one step per
    finished request, so every state sees traffic and swaps land while
    other requests are mid-body."""
    clients, requests_each, pieces = 4, 100, 4
    probe = Probe()

    def letter_app(letter):
        def body(target):
            for _ in range(pieces):
                yield letter * 1000

        return make_app(app_kind, _streamed(body), probe)

    apps = [letter_app(b"A"), letter_app(b"B")]
    opener, bridge = tracked = Bridge({"api": apps[0]})
    timeout = _timeout_for(app_kind)
    outcomes = {"A": 0, "B": 0, "unmounted": 0}
    progress = threading.Condition()
    stop = threading.Event()

    def client():
        for _ in range(requests_each):
            try:
                with opener.open("inproc://api/x", timeout=timeout) as resp:
                    data = resp.read()
            except ib.BridgeError as err:
                assert "'api'" in str(err), err
                kind = "unmounted"
            else:
                kind = data[:1].decode()
                assert data in (b"A" * 1000 * pieces, b"B" * 1000 * pieces), data[:40]
            with progress:
                outcomes[kind] += 1
                progress.notify_all()

    def swapper():
        seen = [0]

        def moved():
            return sum(outcomes.values()) > seen[0] or stop.is_set()

        for step in itertools.cycle((1, 2, 0)):  # A is mounted: B, unmount, A, ...
            with progress:
                progress.wait_for(moved, WAIT)
                if stop.is_set():
                    return
                seen[0] = sum(outcomes.values())
            if step == 2:
                bridge.unmount("api")
            else:
                bridge.mount("api", apps[step])

    mutator = threading.Thread(target=swapper, name="r-mutator", daemon=True)
    mutator.start()
    try:
        _run_threads([client] * clients, timeout=60)
    finally:
        with progress:
            stop.set()
            progress.notify_all()
        mutator.join(WAIT)
        tracked.close()
    assert not mutator.is_alive()
    assert sum(outcomes.values()) == clients * requests_each
    assert outcomes["A"] + outcomes["B"] > 0, outcomes
    assert probe.wait_finished(outcomes["A"] + outcomes["B"])
    _assert_threads_back(worker_pool)


@pytest.mark.parametrize("app_kind, seed", _fault_cases())
def test_fault_random_response(app_kind, seed):
    """One random response case (see _fault_case) on its kind: the caller's
    outcome passes _check_fault_outcome, the app finishes, nothing is left
    running."""
    case = _fault_case(app_kind, seed)
    probe = Probe()
    with Bridge({"api": _fault_app(case, probe)}) as bridge:
        out = _call(lambda: _exchange(bridge.opener, "inproc://api/r", case.timeout, case.plan,
                                      case.close_after))
        assert probe.wait_finished(), "the app never finished (leak)"
        assert _tasks_drained(probe) == 0, "request tasks left on the loop"
    if app_kind == "asgi":
        assert not bridge.new_threads(), "close() left a thread"
    _check_fault_outcome(case, out, probe)


@pytest.mark.parametrize("seed", FAULT_SEEDS)
@pytest.mark.parametrize("app_kind", SYNC_KINDS)
def test_fault_random_request_body(app_kind, seed):
    case = _request_case(seed)
    probe = Probe()
    sizes = itertools.cycle(case.reads)
    readline = case.readline and app_kind != "handler"  # wsgi.input's readline()

    def echo(req):
        tally = Tally(case.app_fault)
        while True:
            data = req.rfile.readline() if readline else req.read(next(sizes))
            if not data:
                if req.headers["Content-Length"] and tally.total < int(
                        req.headers["Content-Length"]):
                    raise AppFault("the request body ended early")
                break
            tally.add(data)
        return 200, [("Content-Type", "text/plain")], [tally.answer()]

    opener = _opener({"api": make_app(app_kind, echo, probe, stream=True)})

    headers = {}
    if case.declare_length:
        headers["Content-Length"] = str(len(case.expected))
    req = urllib.request.Request("inproc://api/echo", data=_request_data(case),
                                 headers=headers, method="POST")

    def run():
        try:
            with opener.open(req, timeout=_timeout_for(app_kind)) as resp:
                return "answer", resp.status, resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return "answer", err.code, err.read()
        except BodyFault as exc:
            return "body-fault", None, str(exc)

    outcome = _call(run)
    if case.body_fault is not None and case.app_fault is not None and app_kind != "handler":
        # The body is pulled as the app reads: whichever fault comes first decides.
        assert outcome[0] == "body-fault" or outcome[:2] == ("answer", 500), outcome
    elif case.body_fault is not None:
        assert outcome[0] == "body-fault", outcome
    elif case.app_fault is not None:
        assert outcome[:2] == ("answer", 500), outcome
    else:
        answer = b"%d:%d" % (len(case.expected), zlib.crc32(case.expected))
        assert outcome == ("answer", 200, answer)
        assert probe.started == 1
    _assert_no_app_left(probe)


@pytest.mark.parametrize("size", [5, 3 * PIECE + 10], ids=["small", "large"])
@pytest.mark.parametrize("kind", READ_KINDS)
def test_fault_body_shorter_than_content_length_raises(app_kind, kind, size, worker_pool):
    probe = Probe()
    body = SOURCE[:size]

    def run():
        got = bytearray()
        with opener.open("inproc://api/", timeout=_timeout_for(app_kind)) as resp:
            with pytest.raises(http.client.IncompleteRead):
                while True:
                    data = _read_once(resp, kind, 4 if size < 10 else 1000)
                    if not data:
                        break
                    got += data
        return bytes(got)

    with Bridge({"api": _length_app(app_kind, probe, len(body) + 100, body)}) as (opener, _):
        got = _call(run)
        assert body.startswith(got)
        assert probe.wait_finished()
    _assert_threads_back(worker_pool)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_fault_body_longer_than_content_length_is_cut(app_kind, method, worker_pool):
    """Bytes past the Content-Length (or any body for HEAD) are not the
    caller's: it gets exactly what the header promised, the app is released --
    as http.server and wsgiref, which let the client stop at the length.  An
    ASGI server refuses the message that passes it (uvicorn: RuntimeError to
    the app, before writing) and the connection drops: the caller's read
    fails, as over uvicorn, never a silent short body."""
    probe = Probe()
    body = SOURCE[:4 * PIECE] * 20  # 5 MiB: more than a pipe holds

    def run():
        req = urllib.request.Request("inproc://api/", method=method)
        with opener.open(req, timeout=_timeout_for(app_kind)) as resp:
            return resp.status, resp.read()

    expected = b"" if method == "HEAD" else body[:1000]
    with Bridge({"api": _length_app(app_kind, probe, 1000, body)}) as (opener, _):
        if app_kind == "asgi" and method == "GET":
            with pytest.raises((OSError, http.client.HTTPException)):
                _call(run)
        else:
            assert _call(run) == (200, expected)
        assert probe.wait_finished()
    assert probe.details("write-error") in ([], [BrokenPipeError])
    _assert_threads_back(worker_pool)


def _write_inside(write):
    write(b"a|")
    yield b"b|"
    write(b"c|")
    yield b"d|"
    write(b"e")


@pytest.mark.parametrize("first, result, tracked, expected", [
    (b"written|", lambda write: (c for c in (b"yielded|", b"end")), True, b"written|yielded|end"),
    # Not under validator on purpose (the app is valid): validator wraps the
    # iterable and hides its len(), which is what makes the bridge give a
    # lone chunk a Content-Length.
    (b"written|", lambda write: [b"returned"], False, b"written|returned"),
    (b"", _write_inside, True, b"a|b|c|d|e"),
], ids=["then-iterable", "then-one-item-list", "inside-iterable"])
@pytest.mark.parametrize("app_kind", WSGI_KINDS)
def test_fault_wsgi_write_keeps_every_byte_in_order(app_kind, first, result, tracked, expected):
    probe = Probe()

    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        if first:
            write(first)
        return result(write)

    opener = _opener({"api": _tracked_wsgi(app, probe) if tracked else app})
    assert _read_all(opener, app_kind) == expected
    if tracked:
        assert probe.wait_finished()


def test_fault_app_ignores_big_request_body(app_kind, worker_pool):
    """An app that answers without reading a request body bigger than a pipe
    holds (bytes or an iterable): the caller still gets the answer, nobody
    hangs."""
    probe = Probe()
    timeout = WAIT if app_kind == "asgi" else _timeout_for(app_kind)
    with Bridge({"api": _length_app(app_kind, probe, 2, b"ok")}) as (opener, _):

        def run():
            for data in (b"x" * (4 * MIB), _fresh_chunks(4 * MIB)):
                req = urllib.request.Request("inproc://api/", data=data, method="POST")
                with opener.open(req, timeout=timeout) as resp:
                    assert (resp.status, resp.read()) == (200, b"ok")

        _call(run)
        assert probe.wait_finished(2)
    _assert_threads_back(worker_pool)
