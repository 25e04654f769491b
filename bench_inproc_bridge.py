#!/usr/bin/env python3
"""Benchmark inproc_bridge against what people use today: urllib over loopback.

Command::

    python bench_inproc_bridge.py                   # full run: a few minutes on 2 cores
    python bench_inproc_bridge.py --quick           # smoke test for CI: < 30 s
    python bench_inproc_bridge.py --rounds 9 --only W1,W3 --json bench.json
    python bench_inproc_bridge.py --peers --only W1,W3   # with the in-process peers

One process, one run.  The same WSGI app and the equivalent
``BaseHTTPRequestHandler`` class are served two ways: in-process through
``inproc_bridge.InProcHandler`` and over 127.0.0.1 by the standard library's
own servers -- a threading ``wsgiref.simple_server.WSGIServer`` for the WSGI
app, ``http.server.ThreadingHTTPServer`` for the handler class.  Both are
called through one urllib opener.

Workloads (every body is checked; a failed check fails the run):

W1  sequential GET of a 13-byte body ("Hello, world!"): us per request.
W2  sequential POST echo of 1 KiB: us per request.
W3  64 MiB streamed in 64 KiB chunks, read with ``resp.read(65536)``: MiB/s.
    Timed passes check the length and spot-check the bytes of every read;
    the untimed warm-up pass compares every byte.  Peak memory growth for a
    256 MiB body is measured in its own pass under ``tracemalloc``, with the
    app producing a new bytes object per chunk, as a real app does.
W4  2,000 server-sent events of 60 bytes, each stamped with
    ``time.perf_counter_ns()`` when produced, 100 us apart (the app sleeps),
    read with ``resp.readline()``: per-event latency p50/p99 in us.  The ASGI
    app awaits ``asyncio.sleep`` instead, which the event loop rounds up to
    about 1 ms on Linux (epoll): its events come further apart, which changes
    the pass's length, not what a latency measures.
W5  8 threads x 250 sequential GETs sharing one opener: requests/s.

Columns: the bridge serving the WSGI app with no timeout (the app runs in the
caller's thread) and with ``timeout=5`` (a worker thread and a pipe), the
handler class with no timeout and with ``timeout=5`` (always a worker), and an
equivalent hand-written ASGI 3 app (always on the bridge's event-loop thread;
W4's app awaits ``asyncio.sleep`` between events).  The WSGI columns are
compared with wsgiref over loopback, the handler columns with http.server over
loopback.  The standard library has no ASGI server: the ASGI column is
compared with uvicorn on 127.0.0.1 when uvicorn is importable, else with the
wsgiref loopback baseline; the header says which.  Loopback requests pass
``timeout=5``, as callers of real sockets do; urllib opens a new connection
per request either way.

``--peers`` adds, when importable, the in-process test transports people use
instead, for W1 and W3: Werkzeug's test client, httpx's ``WSGITransport`` and
``ASGITransport`` (an ``AsyncClient`` under ``asyncio.run``; it buffers the
whole body) and wsgi-intercept (urllib).  They take part in the same rotated
rounds; their table says how many times better the bridge's "WSGI, no timeout"
column (and, for ASGITransport, its "ASGI app" column too) is.  A peer that is
not installed is skipped with a one-line note.  In W3, Werkzeug's client and
httpx's WSGITransport hand the caller the app's own chunk objects, with no
copy; the bridge's ``resp.read(65536)`` makes a new bytes object per read.

Every workload runs several rounds; each round runs every column and its
baseline once, in an order rotated from round to round, so that noise from a
shared machine hits the bridge and the loopback alike.  The table reports the
median over rounds, how many times better the bridge is than its baseline
measured in the same run, and the target from the performance issue with a
met/missed mark.  A missed target does not change the exit status (targets
hold on the dev machine, not on a busy CI box); a failed check does.
"""

import argparse
import asyncio
import faulthandler
import functools
import gc
import http.server
import importlib.util
import json
import os
import platform
import shlex
import socketserver
import statistics
import sys
import textwrap
import threading
import time
import tracemalloc
import urllib.request
import wsgiref.simple_server

import inproc_bridge

MiB = 1 << 20
CHUNK = 64 * 1024

HELLO = b"Hello, world!"
PAYLOAD = bytes(range(256)) * 4  # 1 KiB

# The streamed body repeats one 64 KiB block whose byte k is k % 251: the
# period is prime to the block size, so a read that lost, repeated or shifted
# bytes (by anything but whole blocks, which the length check catches) shows
# up in a spot check of its first and last byte.  RING lets the full check
# compare a read that starts mid-block.
BLOCK = (bytes(range(251)) * (CHUNK // 251 + 1))[:CHUNK]
RING = BLOCK + BLOCK

# One SSE event is 60 bytes: "data: SEQ STAMP_NS PADDING\n\n".
EVENT = b"data: %06d %020d " + b"x" * 24 + b"\n\n"
EVENT_SIZE = len(EVENT % (0, 0))
SSE_PAUSE = 0.0001  # the workload: the app pauses 100 us between events

# Sizes per run mode.  "watchdog": a pass that takes longer than this many
# seconds is a hang: dump every thread's stack and exit rather than wait.
FULL = {
    "rounds": 7,
    "watchdog": 300.0,
    "w1_requests": 2000,
    "w2_requests": 2000,
    "w3_bytes": 64 * MiB,
    "w3_peak_bytes": 256 * MiB,
    "w4_events": 2000,
    "w5_threads": 8,
    "w5_requests": 250,
}
QUICK = {
    "rounds": 3,
    "watchdog": 60.0,
    "w1_requests": 300,
    "w2_requests": 300,
    "w3_bytes": 16 * MiB,
    "w3_peak_bytes": 32 * MiB,
    "w4_events": 300,
    "w5_threads": 8,
    "w5_requests": 50,
}

WORKLOADS = ("W1", "W2", "W3", "W4", "W5")


class BenchFailure(Exception):
    """A response was not what the app sent."""


# ---------------------------------------------------------------------------
# The apps: one WSGI callable and one handler class serving the same routes
# ---------------------------------------------------------------------------


def _stream(size, fresh):
    # The timed passes send one shared block, so they measure the transport,
    # not the app's allocator; the memory pass sends a new bytes object per
    # chunk, as a real app does, so chunks held in flight count.
    for _ in range(size // CHUNK):
        yield memoryview(BLOCK).tobytes() if fresh else BLOCK


def _events(count):
    perf_counter_ns = time.perf_counter_ns
    for i in range(count):
        if i:
            time.sleep(SSE_PAUSE)
        yield EVENT % (i, perf_counter_ns())


def wsgi_app(environ, start_response):
    path = environ["PATH_INFO"]
    query = environ.get("QUERY_STRING", "")
    if path == "/hello":
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(HELLO)))])
        return [HELLO]
    if path == "/echo" and environ["REQUEST_METHOD"] == "POST":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/stream":
        size, _, fresh = query.partition("&")
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", size)])
        return _stream(int(size), fresh == "fresh")
    if path == "/sse":
        # No Content-Length: wsgiref ends the body by closing the connection,
        # the bridge by ending the stream.
        start_response("200 OK", [("Content-Type", "text/event-stream"),
                                  ("Cache-Control", "no-cache")])
        return _events(int(query))
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
    return [b""]


class BenchHandler(http.server.BaseHTTPRequestHandler):
    """The same routes as ``wsgi_app``, served unmodified by both sides.
    HTTP/1.0 (the class default), so the SSE body is close-delimited."""

    def log_message(self, format, *args):
        pass  # a log line per request would measure stderr, not HTTP

    def _head(self, content_type, length=None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/hello":
            self._head("text/plain", len(HELLO))
            self.wfile.write(HELLO)
        elif path == "/stream":
            size, _, fresh = query.partition("&")
            self._head("application/octet-stream", size)
            write = self.wfile.write
            for _ in range(int(size) // CHUNK):
                write(memoryview(BLOCK).tobytes() if fresh == "fresh" else BLOCK)
        elif path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            perf_counter_ns = time.perf_counter_ns
            for i in range(int(query)):
                if i:
                    time.sleep(SSE_PAUSE)
                self.wfile.write(EVENT % (i, perf_counter_ns()))
                self.wfile.flush()
        else:
            self.send_error(404)

    def do_POST(self):
        if self.path != "/echo":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._head("application/octet-stream", len(body))
        self.wfile.write(body)


_HELLO_HEAD = {"type": "http.response.start", "status": 200,
               "headers": [(b"content-type", b"text/plain"),
                           (b"content-length", b"%d" % len(HELLO))]}
_SSE_HEAD = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]}


async def asgi_app(scope, receive, send):
    """The same routes as ``wsgi_app``, as a hand-written ASGI 3 app."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    query = scope["query_string"].decode("latin-1")
    if path == "/hello":
        await send(_HELLO_HEAD)
        await send({"type": "http.response.body", "body": HELLO})
    elif path == "/echo" and scope["method"] == "POST":
        parts = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(parts)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/stream":
        size, _, fresh = query.partition("&")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", size.encode("ascii"))]})
        last = int(size) // CHUNK - 1
        fresh = fresh == "fresh"
        for i in range(last + 1):
            await send({"type": "http.response.body",
                        "body": memoryview(BLOCK).tobytes() if fresh else BLOCK,
                        "more_body": i < last})
        if last < 0:
            await send({"type": "http.response.body"})
    elif path == "/sse":
        # No Content-Length: uvicorn sends it chunked, the bridge ends the stream.
        await send(_SSE_HEAD)
        last = int(query) - 1
        perf_counter_ns = time.perf_counter_ns
        for i in range(last + 1):
            if i:
                await asyncio.sleep(SSE_PAUSE)
            await send({"type": "http.response.body", "body": EVENT % (i, perf_counter_ns()),
                        "more_body": i < last})
        if last < 0:
            await send({"type": "http.response.body"})
    else:
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"0")]})
        await send({"type": "http.response.body"})


# ---------------------------------------------------------------------------
# The loopback baselines
# ---------------------------------------------------------------------------


class _QuietWSGIRequestHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    # A thread per connection, as ThreadingHTTPServer has, so W5 is fair.
    # Non-daemon threads that server_close() joins: no request thread
    # outlives the run.  The default listen backlog of 5 would drop some of
    # W5's 8 simultaneous connects and stall them for a SYN retry.
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128


class _ThreadingHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128


def uvicorn_available():
    return importlib.util.find_spec("uvicorn") is not None


class _Uvicorn:
    """uvicorn serving ``asgi_app`` on 127.0.0.1 in a thread of its own (it
    installs no signal handlers off the main thread)."""

    def __init__(self):
        import uvicorn

        config = uvicorn.Config(asgi_app, host="127.0.0.1", port=0, lifespan="on",
                                log_config=None, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 30.0
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.005)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def close(self):
        self.server.should_exit = True
        self.thread.join()


class LoopbackServers:
    """The baseline servers on 127.0.0.1, each on its own thread: wsgiref,
    http.server and, with ``uvicorn=True``, uvicorn.  Started per workload:
    fresh ports keep the TIME_WAIT sockets of one workload from crowding the
    next."""

    def __init__(self, uvicorn=False):
        self._servers = []
        self._threads = []
        self._uvicorn = None
        self.asgi_url = None
        try:
            wsgi = wsgiref.simple_server.make_server(
                "127.0.0.1", 0, wsgi_app,
                server_class=_ThreadingWSGIServer, handler_class=_QuietWSGIRequestHandler)
            self._start(wsgi)
            self.wsgi_url = "http://127.0.0.1:%d" % wsgi.server_address[1]
            handler = _ThreadingHTTPServer(("127.0.0.1", 0), BenchHandler)
            self._start(handler)
            self.handler_url = "http://127.0.0.1:%d" % handler.server_address[1]
            if uvicorn:
                self._uvicorn = _Uvicorn()
                self.asgi_url = "http://127.0.0.1:%d" % self._uvicorn.port
        except BaseException:
            self.close()  # the ones that did start must not outlive us
            raise

    def _start(self, server):
        self._servers.append(server)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="bench-%s" % type(server).__name__)
        thread.start()
        self._threads.append(thread)

    def close(self):
        if self._uvicorn is not None:
            self._uvicorn.close()
        for server in self._servers:
            server.shutdown()
            server.server_close()  # joins the request threads
        for thread in self._threads:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# Columns
# ---------------------------------------------------------------------------


class Variant:
    """One way of reaching the app: a bridge column or a loopback baseline."""

    peer = False
    funcs = None  # the workloads it runs, {name: function}; None: all of WORKLOAD_FUNCS

    def __init__(self, key, label, app, timeout):
        self.key = key
        self.label = label
        self.app = app  # "wsgi" or "handler"
        self.timeout = timeout
        self.base = None
        self.open = None

    def bind(self, opener, base):
        self.base = base
        if self.timeout is None:
            self.open = opener.open  # urllib's default: the global socket timeout, None
        else:
            self.open = functools.partial(opener.open, timeout=self.timeout)


# (key, label, app, timeout, baseline key); the loopback variants come last.
# The ASGI column's baseline is uvicorn when it is importable, else wsgiref:
# see make_columns.
COLUMNS = (
    ("wsgi", "WSGI, no timeout", "wsgi", None, "wsgi-loop"),
    ("wsgi-t5", "WSGI, timeout=5", "wsgi", 5, "wsgi-loop"),
    ("handler", "handler class", "handler", None, "handler-loop"),
    ("handler-t5", "handler class, timeout=5", "handler", 5, "handler-loop"),
    ("asgi", "ASGI app", "asgi", None, "asgi-loop"),
)
BASELINES = (
    ("wsgi-loop", "wsgiref loopback", "wsgi", 5),
    ("handler-loop", "http.server loopback", "handler", 5),
    ("asgi-loop", "uvicorn loopback", "asgi", 5),  # only with uvicorn
)
BRIDGE_BASE = {"wsgi": "inproc://api", "handler": "inproc://h", "asgi": "inproc://asgi"}


def make_columns(uvicorn):
    """COLUMNS, with the ASGI column compared with wsgiref when there is no
    uvicorn (the standard library has no ASGI server)."""
    return [(key, label, app, timeout,
             "wsgi-loop" if base == "asgi-loop" and not uvicorn else base)
            for key, label, app, timeout, base in COLUMNS]


def make_variants(columns, uvicorn):
    return ([Variant(key, label, app, timeout) for key, label, app, timeout, _ in columns]
            + [Variant(*spec) for spec in BASELINES if uvicorn or spec[0] != "asgi-loop"])


def bind_variants(variants, opener, servers):
    loop_base = {"wsgi": servers.wsgi_url, "handler": servers.handler_url,
                 "asgi": servers.asgi_url}
    for v in variants:
        if not v.peer:
            v.bind(opener, (loop_base if v.key.endswith("-loop") else BRIDGE_BASE)[v.app])


# ---------------------------------------------------------------------------
# Workloads: each returns {metric: value} for one pass, or raises BenchFailure
# ---------------------------------------------------------------------------


def _fail(v, what):
    raise BenchFailure("%s: %s" % (v.label, what))


def _sequential_get(v, n):
    open_ = v.open
    url = v.base + "/hello"
    perf_counter = time.perf_counter
    start = perf_counter()
    for _ in range(n):
        with open_(url) as resp:
            status = resp.status
            body = resp.read()
        if status != 200 or body != HELLO:
            _fail(v, "GET /hello gave %r %r" % (status, body[:64]))
    return (perf_counter() - start) / n * 1e6


def w1(v, cfg, warm):
    n = min(cfg["w1_requests"], 50) if warm else cfg["w1_requests"]
    return {"W1.us": _sequential_get(v, n)}


def w2(v, cfg, warm):
    n = min(cfg["w2_requests"], 50) if warm else cfg["w2_requests"]
    open_ = v.open
    url = v.base + "/echo"
    perf_counter = time.perf_counter
    start = perf_counter()
    for _ in range(n):
        with open_(url, PAYLOAD) as resp:
            status = resp.status
            body = resp.read()
        if status != 200 or body != PAYLOAD:
            _fail(v, "POST /echo gave %r and %d bytes" % (status, len(body)))
    return {"W2.us": (perf_counter() - start) / n * 1e6}


def _stream_pass(v, size, full_check, fresh=False):
    """Read a ``size``-byte stream in 64 KiB reads; return the seconds."""
    mask = CHUNK - 1
    pos = 0
    start = time.perf_counter()
    with v.open("%s/stream?%d%s" % (v.base, size, "&fresh" if fresh else "")) as resp:
        if resp.status != 200:
            _fail(v, "GET /stream gave %r" % (resp.status,))
        read = resp.read
        while True:
            data = read(CHUNK)
            if not data:
                break
            n = len(data)
            if full_check:
                off = pos & mask
                ok = n <= CHUNK and data == RING[off:off + n]
            else:
                ok = data[0] == BLOCK[pos & mask] and data[-1] == BLOCK[(pos + n - 1) & mask]
            if not ok:
                _fail(v, "wrong bytes at offset %d" % pos)
            pos += n
    elapsed = time.perf_counter() - start
    if pos != size:
        _fail(v, "streamed %d bytes, want %d" % (pos, size))
    return elapsed


def w3(v, cfg, warm):
    size = cfg["w3_bytes"]
    # The warm-up pass is the one that compares every byte: doing so in the
    # timed passes would cost about as much as the bridge's own copy.
    return {"W3.mibs": size / MiB / _stream_pass(v, size, full_check=warm)}


def w3_peak(v, cfg):
    """Peak traced memory growth while streaming the big body, in MiB."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        _stream_pass(v, cfg["w3_peak_bytes"], full_check=False, fresh=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"W3.peak": (peak - base) / MiB}


def _percentile(ordered, p):
    # Nearest rank: an actual observed latency, never an interpolation.
    return ordered[max(0, -(-len(ordered) * p // 100) - 1)]


def w4(v, cfg, warm):
    count = min(cfg["w4_events"], 50) if warm else cfg["w4_events"]
    perf_counter_ns = time.perf_counter_ns
    latencies = [0] * count
    with v.open("%s/sse?%d" % (v.base, count)) as resp:
        if resp.status != 200:
            _fail(v, "GET /sse gave %r" % (resp.status,))
        readline = resp.readline
        for i in range(count):
            line = readline()
            now = perf_counter_ns()
            if len(line) != EVENT_SIZE - 1 or line[:6] != b"data: " or int(line[6:12]) != i:
                _fail(v, "event %d: got %r" % (i, line))
            latencies[i] = now - int(line[13:33])
            if readline() != b"\n":
                _fail(v, "event %d: no blank line after it" % i)
        if readline() != b"":
            _fail(v, "data after the last event")
    latencies.sort()
    if latencies[0] < 0:
        _fail(v, "an event arrived before it was produced")
    return {"W4.p50": _percentile(latencies, 50) / 1e3,
            "W4.p99": _percentile(latencies, 99) / 1e3}


def w5(v, cfg, warm):
    threads = cfg["w5_threads"]
    per_thread = min(cfg["w5_requests"], 10) if warm else cfg["w5_requests"]
    # All threads start together; the clock runs from the release to the
    # last join.  A thread that fails (or a barrier that breaks) is reported.
    barrier = threading.Barrier(threads + 1)
    errors = []

    def client():
        try:
            barrier.wait(timeout=60)
            _sequential_get(v, per_thread)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=client, name="bench-w5-%d" % i) for i in range(threads)]
    for thread in workers:
        thread.start()
    try:
        barrier.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass  # a client's error says why
    start = time.perf_counter()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        if isinstance(errors[0], BenchFailure):
            raise errors[0]
        _fail(v, "a client thread raised %r" % (errors[0],))
    return {"W5.rps": threads * per_thread / elapsed}


WORKLOAD_FUNCS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5}


# ---------------------------------------------------------------------------
# In-process peers (--peers): the test transports people use instead, W1 and
# W3 only, each through its own client, checked as the bridge's responses are
# ---------------------------------------------------------------------------

PEER_HOST = "peer.test"


class Peer(Variant):
    peer = True

    def __init__(self, key, label, app, dist):
        super().__init__(key, label, app, None)
        self.dist = dist  # the distribution whose version the header shows
        self.close = None  # set by the factory when there is something to undo


def _count(cfg, key, warm):
    return min(cfg[key], 50) if warm else cfg[key]


def _pieces(chunks):
    # A buffered body arrives as one chunk: check it block by block.
    for data in chunks:
        if len(data) <= CHUNK:
            yield data
        else:
            view = memoryview(data)
            for k in range(0, len(view), CHUNK):
                yield view[k:k + CHUNK]


def _check_chunks(v, chunks, size, full_check):
    """Check a body given as chunks of any size as ``_stream_pass`` checks
    the bridge's reads: the length, and the first and last byte of each chunk
    (or, with ``full_check``, every byte)."""
    mask = CHUNK - 1
    pos = 0
    for data in _pieces(chunks):
        n = len(data)
        if not n:
            continue
        if full_check:
            off = pos & mask
            ok = data == RING[off:off + n]
        else:
            ok = data[0] == BLOCK[pos & mask] and data[-1] == BLOCK[(pos + n - 1) & mask]
        if not ok:
            _fail(v, "wrong bytes at offset %d" % pos)
        pos += n
    if pos != size:
        _fail(v, "streamed %d bytes, want %d" % (pos, size))


def _peer_werkzeug(peer):
    from werkzeug.test import Client

    get = Client(wsgi_app).get

    def peer_w1(v, cfg, warm):
        n = _count(cfg, "w1_requests", warm)
        perf_counter = time.perf_counter
        start = perf_counter()
        for _ in range(n):
            with get("/hello") as resp:
                status = resp.status_code
                body = resp.get_data()
            if status != 200 or body != HELLO:
                _fail(v, "GET /hello gave %r %r" % (status, body[:64]))
        return {"W1.us": (perf_counter() - start) / n * 1e6}

    def peer_w3(v, cfg, warm):
        size = cfg["w3_bytes"]
        start = time.perf_counter()
        with get("/stream?%d" % size) as resp:  # not buffered: the app's chunks as they come
            if resp.status_code != 200:
                _fail(v, "GET /stream gave %r" % (resp.status_code,))
            _check_chunks(v, resp.iter_encoded(), size, warm)
        return {"W3.mibs": size / MiB / (time.perf_counter() - start)}

    peer.funcs = {"W1": peer_w1, "W3": peer_w3}


def _peer_httpx_wsgi(peer):
    import httpx

    client = httpx.Client(transport=httpx.WSGITransport(app=wsgi_app),
                          base_url="http://" + PEER_HOST)
    get = client.get

    def peer_w1(v, cfg, warm):
        n = _count(cfg, "w1_requests", warm)
        perf_counter = time.perf_counter
        start = perf_counter()
        for _ in range(n):
            resp = get("/hello")
            if resp.status_code != 200 or resp.content != HELLO:
                _fail(v, "GET /hello gave %r %r" % (resp.status_code, resp.content[:64]))
        return {"W1.us": (perf_counter() - start) / n * 1e6}

    def peer_w3(v, cfg, warm):
        size = cfg["w3_bytes"]
        start = time.perf_counter()
        with client.stream("GET", "/stream?%d" % size) as resp:
            if resp.status_code != 200:
                _fail(v, "GET /stream gave %r" % (resp.status_code,))
            _check_chunks(v, resp.iter_raw(), size, warm)
        return {"W3.mibs": size / MiB / (time.perf_counter() - start)}

    peer.funcs = {"W1": peer_w1, "W3": peer_w3}
    peer.close = client.close


def _peer_httpx_asgi(peer):
    import httpx

    def client():
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app),
                                 base_url="http://" + PEER_HOST)

    async def gets(v, n):
        async with client() as c:
            get = c.get
            perf_counter = time.perf_counter
            start = perf_counter()
            for _ in range(n):
                resp = await get("/hello")
                if resp.status_code != 200 or resp.content != HELLO:
                    _fail(v, "GET /hello gave %r %r" % (resp.status_code, resp.content[:64]))
            return perf_counter() - start

    async def stream(v, size, full_check):
        async with client() as c:
            start = time.perf_counter()
            resp = await c.get("/stream?%d" % size)  # ASGITransport buffers the whole body
            if resp.status_code != 200:
                _fail(v, "GET /stream gave %r" % (resp.status_code,))
            _check_chunks(v, (resp.content,), size, full_check)
            return time.perf_counter() - start

    def peer_w1(v, cfg, warm):
        n = _count(cfg, "w1_requests", warm)
        return {"W1.us": asyncio.run(gets(v, n)) / n * 1e6}

    def peer_w3(v, cfg, warm):
        size = cfg["w3_bytes"]
        return {"W3.mibs": size / MiB / asyncio.run(stream(v, size, warm))}

    peer.funcs = {"W1": peer_w1, "W3": peer_w3}


def _peer_wsgi_intercept(peer):
    import wsgi_intercept
    from wsgi_intercept import urllib_intercept

    # urllib's global opener: urlopen() reaches the app, as the docs show.
    # install_opener() refuses to run with http_proxy or https_proxy set.
    urllib_intercept.install_opener()
    try:
        wsgi_intercept.add_wsgi_intercept(PEER_HOST, 80, lambda: wsgi_app)
    except BaseException:
        urllib_intercept.uninstall_opener()
        raise

    def close():
        wsgi_intercept.remove_wsgi_intercept(PEER_HOST, 80)
        urllib_intercept.uninstall_opener()

    peer.base = "http://" + PEER_HOST
    peer.open = urllib.request.urlopen
    peer.funcs = {"W1": w1, "W3": w3}  # the bridge's own workloads: it is urllib too
    peer.close = close


# (key, label, app, distribution, factory)
PEERS = (
    ("peer-werkzeug", "peer: werkzeug test client", "wsgi", "werkzeug", _peer_werkzeug),
    ("peer-httpx-wsgi", "peer: httpx WSGITransport", "wsgi", "httpx", _peer_httpx_wsgi),
    ("peer-httpx-asgi", "peer: httpx ASGITransport", "asgi", "httpx", _peer_httpx_asgi),
    ("peer-wsgi-intercept", "peer: wsgi-intercept (urllib)", "wsgi", "wsgi-intercept",
     _peer_wsgi_intercept),
)
PEER_WORKLOADS = ("W1", "W3")


def dist_version(dist):
    try:
        import importlib.metadata

        return importlib.metadata.version(dist)
    except Exception:
        return "?"


def make_peers():
    """The peers that are importable and set up, and a note per peer skipped."""
    peers, notes = [], []
    for key, label, app, dist, factory in PEERS:
        if importlib.util.find_spec(dist.replace("-", "_")) is None:
            notes.append("%s skipped: %s is not installed" % (label, dist))
            continue
        peer = Peer(key, label, app, dist)
        try:
            factory(peer)
        except Exception as exc:
            notes.append("%s skipped: %s: %s" % (label, type(exc).__name__, exc))
            continue
        peers.append(peer)
    return peers, notes


def close_peers(peers):
    for peer in peers:
        if peer.close is not None:
            peer.close()


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def _guarded(seconds, func, *args):
    # The bridge promises never to hang; if it does, say where.
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        return func(*args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_workload(name, variants, cfg, samples, failures):
    """Warm every variant up, then run the timed rounds, rotating the order
    of the variants from round to round."""
    variants = [v for v in variants if v.funcs is None or name in v.funcs]
    live = []
    for v in variants:
        try:
            _guarded(cfg["watchdog"], (v.funcs or WORKLOAD_FUNCS)[name], v, cfg, True)
        except Exception as exc:
            failures["%s %s" % (name, v.key)] = "%s: %s" % (type(exc).__name__, exc)
        else:
            live.append(v)
    rounds = cfg["rounds"]
    for r in range(rounds):
        shift = r % len(live) if live else 0
        for v in live[shift:] + live[:shift]:
            if "%s %s" % (name, v.key) in failures:
                continue
            gc.collect()  # garbage from the previous pass is not this one's cost
            try:
                result = _guarded(cfg["watchdog"], (v.funcs or WORKLOAD_FUNCS)[name], v, cfg,
                                  False)
            except Exception as exc:
                failures["%s %s" % (name, v.key)] = "%s: %s" % (type(exc).__name__, exc)
                continue
            for metric, value in result.items():
                samples.setdefault(metric, {}).setdefault(v.key, []).append(value)
    if name == "W3":
        # tracemalloc slows every allocation, so the memory pass is its own.
        for v in live:
            if v.peer or "%s %s" % (name, v.key) in failures:
                continue
            try:
                result = _guarded(cfg["watchdog"], w3_peak, v, cfg)
            except Exception as exc:
                failures["W3 %s peak" % v.key] = "%s: %s" % (type(exc).__name__, exc)
                continue
            for metric, value in result.items():
                samples.setdefault(metric, {}).setdefault(v.key, []).append(value)


def _bridge_workers():
    return [t for t in threading.enumerate() if t.name == "inproc_bridge-worker"]


def stop_bridge_workers(opener):
    """Let the bridge's idle worker threads exit now rather than after
    ``WORKER_IDLE_SECONDS``: the module has no shutdown call.  With a zero
    idle time, a worker exits after its next job; each request with a
    timeout hands a job to one idle worker."""
    saved = inproc_bridge.WORKER_IDLE_SECONDS
    inproc_bridge.WORKER_IDLE_SECONDS = 0.0
    try:
        deadline = time.monotonic() + 10.0
        while _bridge_workers() and time.monotonic() < deadline:
            with opener.open(BRIDGE_BASE["wsgi"] + "/hello", timeout=5) as resp:
                resp.read()
            for thread in _bridge_workers():
                thread.join(0.01)
    finally:
        inproc_bridge.WORKER_IDLE_SECONDS = saved


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

# metric: (workload, label template, unit, higher is better, format)
METRICS = (
    ("W1.us", "W1", "W1 GET {w1_body} B", "us/req", False, "%.1f"),
    ("W2.us", "W2", "W2 POST echo 1 KiB", "us/req", False, "%.1f"),
    ("W3.mibs", "W3", "W3 stream {w3_mib} MiB", "MiB/s", True, "%.0f"),
    ("W3.peak", "W3", "W3 peak growth, {w3_peak_mib} MiB", "MiB", False, "%.2f"),
    ("W4.p50", "W4", "W4 SSE {w4_events} events p50", "us", False, "%.1f"),
    ("W4.p99", "W4", "W4 SSE {w4_events} events p99", "us", False, "%.1f"),
    ("W5.rps", "W5", "W5 {w5_threads} thr x {w5_requests} GET", "req/s", True, "%.0f"),
)

# (metric, column): (absolute limit, minimum ratio to loopback or None), from
# the performance issue; the limit is a ceiling or a floor as the metric's
# direction says.
TARGETS = {
    ("W1.us", "wsgi"): (25, 20), ("W1.us", "wsgi-t5"): (90, None),
    ("W1.us", "handler"): (150, 4),
    ("W2.us", "wsgi"): (25, 20), ("W2.us", "wsgi-t5"): (90, None),
    ("W2.us", "handler"): (150, 4),
    ("W3.mibs", "wsgi"): (8192, None), ("W3.mibs", "wsgi-t5"): (4096, None),
    ("W3.mibs", "handler"): (3072, None),
    ("W3.peak", "wsgi"): (8, None), ("W3.peak", "handler"): (8, None),
    ("W4.p50", "wsgi"): (10, None), ("W4.p99", "wsgi"): (50, None),
    ("W4.p50", "wsgi-t5"): (40, None), ("W4.p99", "wsgi-t5"): (150, None),
    ("W4.p50", "handler"): (40, None), ("W4.p99", "handler"): (150, None),
    ("W5.rps", "wsgi"): (30000, None), ("W5.rps", "wsgi-t5"): (10000, None),
    ("W5.rps", "handler"): (6000, None),
}


def _labels(cfg):
    return dict(cfg, w1_body=len(HELLO), w3_mib=cfg["w3_bytes"] // MiB,
                w3_peak_mib=cfg["w3_peak_bytes"] // MiB)


def build_rows(samples, failures, cfg, only, columns):
    labels = _labels(cfg)
    rows = []
    for metric, workload, label, unit, higher, fmt in METRICS:
        if workload not in only:
            continue
        values = samples.get(metric, {})
        for key, column, _, _, base_key in columns:
            row = {"workload": workload, "metric": metric,
                   "label": label.format(**labels), "unit": unit,
                   "column": column, "column_key": key, "baseline": base_key,
                   "higher_is_better": higher, "format": fmt,
                   "bridge": None, "loopback": None, "ratio": None,
                   "bridge_rounds": values.get(key, []),
                   "loopback_rounds": values.get(base_key, []),
                   "target": None, "met": None}
            failed = "%s %s" % (workload, key) in failures or (
                metric == "W3.peak" and "W3 %s peak" % key in failures)
            row["failed"] = failed
            if row["bridge_rounds"] and not failed:
                row["bridge"] = statistics.median(row["bridge_rounds"])
            if row["loopback_rounds"]:
                row["loopback"] = statistics.median(row["loopback_rounds"])
            b, lo = row["bridge"], row["loopback"]
            # Memory growth is a bound, not a speed: a ratio would say little.
            if metric != "W3.peak" and b and lo:
                row["ratio"] = b / lo if higher else lo / b
            target = TARGETS.get((metric, key))
            if target is not None:
                limit, min_ratio = target
                text = "%s %g" % (">=" if higher else "<=", limit)
                if min_ratio is not None:
                    text += ", >= %gx loopback" % min_ratio
                row["target"] = text
                if b is not None:
                    ok = b >= limit if higher else b <= limit
                    if min_ratio is not None:
                        ok = ok and row["ratio"] is not None and row["ratio"] >= min_ratio
                    row["met"] = ok
            rows.append(row)
    return rows


def build_peer_rows(samples, failures, cfg, only, peers, columns):
    """A row per peer and metric: the peer against the bridge's "WSGI, no
    timeout" column, and an ASGI peer against the "ASGI app" column too."""
    labels = _labels(cfg)
    column_label = {key: label for key, label, _, _, _ in columns}
    rows = []
    for metric, workload, label, unit, higher, fmt in METRICS:
        if workload not in only or workload not in PEER_WORKLOADS or metric == "W3.peak":
            continue
        values = samples.get(metric, {})
        for peer in peers:
            failed = "%s %s" % (workload, peer.key) in failures
            peer_rounds = values.get(peer.key, [])
            value = statistics.median(peer_rounds) if peer_rounds and not failed else None
            for ref in ("wsgi", "asgi") if peer.app == "asgi" else ("wsgi",):
                ref_rounds = values.get(ref, [])
                ref_failed = "%s %s" % (workload, ref) in failures
                bridge = statistics.median(ref_rounds) if ref_rounds and not ref_failed else None
                ratio = None
                if value and bridge:
                    ratio = bridge / value if higher else value / bridge
                rows.append({"workload": workload, "metric": metric,
                             "label": label.format(**labels), "unit": unit,
                             "peer": peer.label, "peer_key": peer.key,
                             "column": column_label[ref], "column_key": ref,
                             "higher_is_better": higher, "format": fmt,
                             "value": value, "bridge": bridge, "ratio": ratio,
                             "peer_rounds": peer_rounds, "bridge_rounds": ref_rounds,
                             "failed": failed})
    return rows


def _spread(value, rounds):
    if value is not None and len(rounds) > 1 and value:
        spread = (max(rounds) - min(rounds)) / abs(value) * 100
        return ">999%" if spread > 999 else "%.0f%%" % spread
    return "-"


def _render(header, rows, lines, right):
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]

    def render(cells):
        out = [cell.rjust(w) if i in right else cell.ljust(w)
               for i, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    print(render(header))
    print(render(["-" * w for w in widths]))
    previous = None
    for row, line in zip(rows, lines):
        if previous is not None and row["metric"] != previous:
            print()
        previous = row["metric"]
        print(render(line))


def print_peer_table(rows):
    header = ("workload", "unit", "in-process peer", "peer", "bridge column", "bridge",
              "x bridge", "spread", "")
    lines = []
    for row in rows:
        fmt = row["format"]
        value, b = row["value"], row["bridge"]
        if row["failed"]:
            mark = "FAILED"
        elif value is None:
            mark = "no data"
        else:
            mark = ""
        lines.append((row["label"], row["unit"], row["peer"],
                      "-" if value is None else fmt % value, row["column"],
                      "-" if b is None else fmt % b,
                      "-" if row["ratio"] is None else "%.1fx" % row["ratio"],
                      _spread(value, row["peer_rounds"]), mark))
    _render(header, rows, lines, {3, 5, 6, 7})


def print_table(rows):
    header = ("workload", "unit", "column", "bridge", "loopback", "x loop", "spread",
              "target", "")
    lines = []
    for row in rows:
        fmt = row["format"]
        b, lo = row["bridge"], row["loopback"]
        spread = _spread(b, row["bridge_rounds"])
        if row["failed"]:
            mark = "FAILED"
        elif b is None:
            mark = "no data"
        elif row["met"] is None:
            mark = ""
        else:
            mark = "met" if row["met"] else "MISSED"
        lines.append((row["label"], row["unit"], row["column"],
                      "-" if b is None else fmt % b,
                      "-" if lo is None else fmt % lo,
                      "-" if row["ratio"] is None else "%.1fx" % row["ratio"],
                      spread, row["target"] or "-", mark))
    _render(header, rows, lines, {3, 4, 5, 6})


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except (AttributeError, OSError):
        load = "n/a"
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "python": "%s %s" % (platform.python_implementation(), sys.version.replace("\n", " ")),
        "inproc_bridge": getattr(inproc_bridge, "__version__", "?"),
        "load_average_at_start": load,
    }


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark inproc_bridge against urllib over loopback.")
    parser.add_argument("--quick", action="store_true",
                        help="few rounds and small sizes (< 30 s): a smoke test")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="timed rounds per workload (default: %d, or %d with --quick)"
                        % (FULL["rounds"], QUICK["rounds"]))
    parser.add_argument("--only", metavar="W1,W3",
                        help="run only these workloads (of %s)" % ",".join(WORKLOADS))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--peers", action="store_true",
                        help="also measure the in-process peers that are importable "
                        "(werkzeug, httpx, wsgi-intercept) on W1 and W3")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.only:
        only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in only if w not in WORKLOADS]
        if unknown or not only:
            parser.error("--only takes a comma-separated list of %s" % ",".join(WORKLOADS))
        args.only = [w for w in WORKLOADS if w in only]
    else:
        args.only = list(WORKLOADS)
    return args


def asgi_baseline(uvicorn):
    """What the ASGI column is compared with, for the header and the JSON."""
    if not uvicorn:
        return "wsgiref loopback (no ASGI server in the stdlib; uvicorn is not installed)"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return "uvicorn %s on 127.0.0.1 (%s %s)" % (dist_version("uvicorn"), http, dist_version(http))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        cfg["rounds"] = args.rounds
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    machine = machine_info()
    uvicorn = uvicorn_available()
    columns = make_columns(uvicorn)
    asgi_base = asgi_baseline(uvicorn)

    print("inproc_bridge %s benchmark: bridge vs urllib over loopback" % machine["inproc_bridge"])
    print("command:  %s" % command)
    print("machine:  %s; %s; %s CPUs (%s usable); load average %s"
          % (machine["platform"], machine["cpu"], machine["cpu_count"],
             machine["usable_cpus"], machine["load_average_at_start"]))
    print("python:   %s" % machine["python"])
    print("mode:     %s; %d rounds; workloads %s"
          % ("quick" if args.quick else "full", cfg["rounds"], ",".join(args.only)))
    print("ASGI:     baseline %s" % asgi_base)

    peers, peer_notes, peer_versions = [], [], {}
    if args.peers:
        if any(w in PEER_WORKLOADS for w in args.only):
            peers, peer_notes = make_peers()
            peer_versions = {peer.dist: dist_version(peer.dist) for peer in peers}
            print("peers:    %s" % (", ".join("%s %s" % item for item in peer_versions.items())
                                    or "none importable"))
            for note in peer_notes:
                print("          %s" % note)
        else:
            peer_notes = ["the peers run only %s" % ",".join(PEER_WORKLOADS)]
            print("peers:    none: %s" % peer_notes[0])
    print()
    sys.stdout.flush()

    bridge = inproc_bridge.InProcHandler({"api": wsgi_app, "h": BenchHandler})
    # One opener for every variant, so both sides pay for the same handler
    # chain; an empty ProxyHandler keeps *_proxy variables off loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), bridge)
    variants = make_variants(columns, uvicorn) + peers
    samples = {}
    failures = {}
    started = time.perf_counter()
    try:
        try:
            bridge.mount("asgi", asgi_app)  # starts the bridge's event loop, runs the lifespan
        except Exception as exc:
            failures["mount asgi"] = "%s: %s" % (type(exc).__name__, exc)
        for name in args.only:
            t0 = time.perf_counter()
            with LoopbackServers(uvicorn) as servers:
                bind_variants(variants, opener, servers)
                run_workload(name, variants, cfg, samples, failures)
            print("[%s done in %.1f s]" % (name, time.perf_counter() - t0),
                  file=sys.stderr, flush=True)
    finally:
        _guarded(cfg["watchdog"], stop_bridge_workers, opener)
        _guarded(cfg["watchdog"], bridge.close)  # stops the ASGI event-loop thread
        close_peers(peers)

    rows = build_rows(samples, failures, cfg, args.only, columns)
    print_table(rows)
    print()
    print(textwrap.fill(
        "bridge/loopback: median over rounds; x loop: how many times better the bridge is "
        "than its loopback baseline in this run (WSGI columns: wsgiref, handler columns: "
        "http.server, ASGI column: %s); spread: (max - min) / median of the bridge's rounds."
        % ("uvicorn" if uvicorn else "wsgiref, as there is no stdlib ASGI server"), 80))
    if args.quick:
        print("--quick: sizes are smaller than the targets assume; treat marks as a smoke test.")
    peer_rows = build_peer_rows(samples, failures, cfg, args.only, peers, columns)
    if peer_rows:
        print()
        print_peer_table(peer_rows)
        print()
        print("peer/bridge: median over the same rounds; x bridge: how many times better the")
        print("bridge column is than the peer; spread: (max - min) / median of the peer's rounds.")
        if "W3" in args.only:
            print("W3: werkzeug and httpx WSGITransport pass the app's own chunks on (no copy);")
            print("ASGITransport and wsgi-intercept buffer the whole body; the bridge streams")
            print("and resp.read(65536) copies each read.")
    try:
        load_end = "%.2f %.2f %.2f" % os.getloadavg()
    except (AttributeError, OSError):
        load_end = "n/a"
    marks = [row["met"] for row in rows if row["met"] is not None]
    print("targets: %d met, %d missed; total %.1f s; load average at end %s"
          % (marks.count(True), marks.count(False), time.perf_counter() - started, load_end))

    leftover = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if leftover:
        failures["exit"] = "threads still running: %s" % ", ".join(leftover)
    if failures:
        print()
        print("FAILURES:")
        for key, why in sorted(failures.items()):
            print("  %s: %s" % (key, why))

    if args.json:
        result = {"command": command, "machine": machine, "config": cfg,
                  "mode": "quick" if args.quick else "full", "workloads": args.only,
                  "asgi_baseline": asgi_base,
                  "rows": [{k: v for k, v in row.items() if k != "format"} for row in rows],
                  "peers": {"versions": peer_versions, "notes": peer_notes,
                            "rows": [{k: v for k, v in row.items() if k != "format"}
                                     for row in peer_rows]},
                  "failures": failures,
                  "load_average_at_end": load_end}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
