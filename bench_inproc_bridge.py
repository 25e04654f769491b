#!/usr/bin/env python3
"""Benchmark inproc_bridge against what people use today: urllib over loopback.

Command::

    python bench_inproc_bridge.py                   # full run: a few minutes on 2 cores
    python bench_inproc_bridge.py --quick           # smoke test for CI: < 30 s
    python bench_inproc_bridge.py --rounds 9 --only W1,W3 --json bench.json
    python bench_inproc_bridge.py --peers --only W1,W3   # with the in-process peers
    python bench_inproc_bridge.py --instructions    # instructions per request (callgrind)
    python bench_inproc_bridge.py --instructions --quick  # its smoke test for CI
    python bench_inproc_bridge.py --record --only W1,W2   # what record=True costs
    python bench_inproc_bridge.py --instructions --only W1 --columns wsgi,wsgi+rec

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

``--record`` adds a recorded twin of the "WSGI, no timeout", "WSGI,
timeout=5", "handler class" and "ASGI app" columns: keys ``wsgi+rec``,
``wsgi-t5+rec``, ``handler+rec`` and ``asgi+rec``, the same apps and timeouts
on a second bridge built with ``record=True`` (its call journal keeps the
last 1,000 calls, each with up to 64 KiB of either body), reached through a
second opener built as the first is.  They take part in the same rotated
rounds, and a "recording costs" table sets each against its column: the
value without and with recording, the difference and the difference as a
share.  At the end, every call in the journal must be complete with a 200,
or the run fails.  Opt-in: they would make the full run half as long again.

``--columns KEY,KEY`` measures only these columns, baselines (``wsgi-loop``,
``handler-loop``, ``asgi-loop``) and peers (``peer-werkzeug``, ...; naming
one measures it without ``--peers``), in either mode; a column's baseline
runs only if it is named too (else "x loop" shows "-"), and naming a
``+rec`` column implies ``--record``.

``--peers`` adds, when importable, the in-process test transports people use
instead, for W1, W2 and W3: Werkzeug's test client, httpx's ``WSGITransport`` and
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

``--instructions [N]`` counts CPU work instead of timing it, which does not
move with the machine's load: instructions per request of W1 and W2 for every
column, both loopback baselines, a ``data:`` URL through the same urllib
opener (urllib's own floor: no transport at all), uvicorn on 127.0.0.1 and
the peers, whichever are importable (``--peers`` is implied); and OP,
instructions per new opener of ``urllib.request.build_opener()`` and of
``OpenerFactory.opener_for()`` (N = 20 openers, 3 with ``--quick``).  W1, W2
and OP are this mode's ``--only`` choices and its default.  For each
workload and column the benchmark runs itself twice under ``valgrind
--tool=callgrind --trace-children=no``, in a child mode that sets up that one
column, warms it up, sends exactly K requests and exits, once with K = N and
once with K = 2N (N = 200 by default, 20 with ``--quick``), and reports
(I(2N) - I(N)) / N, where I is callgrind's total instruction count ("totals:"
line) of the child: start-up, imports, warm-up and exit cancel out.  Callgrind
sums the instructions of every thread of the process into one count (no
``--separate-threads``), so the bridge's worker and event-loop threads count,
and so do the loopback servers, uvicorn and their per-connection threads:
they run in the child too.  What is not counted: the kernel's work (the
loopback TCP stack, pipes, futexes, thread creation), so loopback's count
understates its CPU cost.  Children run with ``PYTHONHASHSEED=0`` and must
import the same inproc_bridge.py as the parent (a child that imports another
copy fails); Python looks in the script's own directory first, so to measure
a frozen copy of the module, run a copy of this script placed beside it.  The
report shows the module's path and SHA-256 and warns if the file changed while
the run was going on.  ``--rounds`` repeats each pair
(default 1: a count moves by about 1 % from run to run, up to 2 % for
uvicorn), ``--columns``
measures only some columns, ``--jobs`` runs children side by side (their
counts do not depend on it) and ``--callgrind-dir`` keeps the output files for
``callgrind_annotate``.  The table gives each count as a share of its loopback
baseline and of the ``data:`` floor, the peer table the bridge against each
peer, and the targets rows whether the instruction targets of the
performance issue are met.  With ``--record`` (or a ``+rec`` key in
``--columns``) the recorded twins are counted too and the "recording costs"
table compares instructions per request; a recording child's warm-up is at
least 1,000 requests, so the journal is full and each counted request also
drops the oldest call, as on a bridge that has been recording for a while,
and the child fails unless the journal then holds 1,000 complete calls.
Without valgrind it says so and exits 0.

Results, targets and tuning notes (moved here from README.rst)
================================================================

The README keeps a few lines for users; this is the maintainers' record.

Full runs
---------

Three full runs, ``python bench_inproc_bridge.py --peers --json runK.json``
(7 rounds each), then ``python bench_inproc_bridge.py --summarize run1.json
run2.json run3.json``, on a shared 2-core AMD EPYC VM (Firecracker), Linux
6.18, CPython 3.11.7, with werkzeug 3.1.9, httpx 0.28.1, wsgi-intercept
1.13.1 and uvicorn 0.54.0 (h11) installed, on 2026-12-02.  Each cell: the
median of the three runs' medians, and their range; "x loop": how many times
less time (more MiB/s, more req/s) than the loopback baseline in the same run.

=====================================  ======================  =======================  =======================  =======================
Workload                               WSGI, no timeout        WSGI, timeout=5          handler class            ASGI app
=====================================  ======================  =======================  =======================  =======================
W1 small GET, us (x loop)              25.1 (23.2-27.7) 29.5x  150.4 (117.8-160.3) 5.3x  246.5 (209.1-280.0) 2.8x  180.2 (164.8-205.2) 3.9x
W2 POST echo 1 KiB, us (x loop)        27.8 (26.9-28.6) 30.0x  162.2 (154.1-170.7) 5.1x  280.5 (256.8-329.4) 2.6x  200.2 (197.4-204.3) 4.3x
W3 64 MiB, MiB/s (x loop)              11,055 8.5x             5,218 3.5x               4,740 3.2x               4,095 2.5x
W3 peak growth for 256 MiB, MiB        0.33                    1.27                     1.27                     1.27
W5 8 threads x 250 GETs, req/s         31,161 32.8x            6,652 6.9x               3,658 3.3x               4,879 3.7x
two-thread round trip (floor), W1, us  50.6 (44.4-62.0)
=====================================  ======================  =======================  =======================  =======================

Loopback took 795 us (W1) for wsgiref, 653 us for http.server and 777 us for
uvicorn.  The peers, in the same runs (W1 / W2 us; W3 MiB/s): Werkzeug's
test client 62.4 / 59.3 (2.2x / 2.1x the bridge's WSGI column), 64,365 (it
hands the app's own chunks over, uncopied); httpx ``WSGITransport`` 106.2 /
107.8, 65,128; httpx ``ASGITransport`` 185.8 / 191.5 (1.0x / 0.9x the
bridge's ASGI column), 1,486 (it buffers the whole body: 2.8x less than the
ASGI column); wsgi-intercept 60.2 / 74.3, 1,143.

The same three runs with the process pinned to one CPU (``taskset -c 0
python bench_inproc_bridge.py --peers ...``):

=====================================  ======================  ======================  =======================  ======================
Workload                               WSGI, no timeout        WSGI, timeout=5         handler class            ASGI app
=====================================  ======================  ======================  =======================  ======================
W1 small GET, us (x loop)              24.0 (23.4-25.6) 21.1x  57.9 (56.6-75.2) 8.7x   137.1 (133.3-152.9) 3.2x  80.8 (78.8-100.2) 6.1x
W2 POST echo 1 KiB, us (x loop)        27.2 (25.9-31.8) 21.6x  65.8 (60.3-74.5) 9.0x   159.5 (149.0-179.7) 3.2x  98.2 (84.7-116.1) 6.2x
W3 64 MiB, MiB/s (x loop)              13,981 6.8x             9,727 4.7x              9,242 4.7x               5,562 3.3x
W5 8 threads x 250 GETs, req/s         41,663 19.9x            16,085 8.4x             7,440 3.3x               13,683 5.4x
two-thread round trip (floor), W1, us  11.7 (11.5-12.2)
=====================================  ======================  ======================  =======================  ======================

Pinned, httpx's ASGITransport took 157.6 us (W1) and 181.3 us (W2), 1.9x and
1.8x the bridge's ASGI column, and streamed W3 at 1,650 MiB/s (3.5x less);
Werkzeug's client took 47.9 / 55.2 us (2.0x the bridge's WSGI column).

Why pinning matters on this VM: a thread woken on the other vCPU takes ~30 us
to start (the vCPU is halted and the host must schedule it) and then runs on
cold caches.  One W1 request with ``timeout=5``, timed inside the process
(medians, us from ``open()``): the caller hands the request over at 36 and
waits at 51; the worker starts at 80 (a 29 us wake-up); the app's head is in
the slot at 95; the worker is done at 113; the caller wakes at 139 (26 us
after the worker blocked), has its response at 161 and the body at 179.  The
same work takes 25 us in the caller's thread alone.  On one CPU a hand-off is
a context switch, ~6 us each way, and the worker paths are 1.8-2.6x faster; so
is loopback (two threads as well), by less.  The bridge does not pin threads
itself: where a process runs is its owner's choice (``taskset``,
``os.sched_setaffinity``), and a pinned worker would take a CPU from an app
that releases the GIL.

Instructions per request
------------------------

``python bench_inproc_bridge.py --instructions --jobs 2 --only W1,OP`` at the
same commit (N = 200; the peers and uvicorn from the same venv):

=================================  ===========  ======================
W1 GET 13 B                        Ir/request   of loopback
=================================  ===========  ======================
WSGI, no timeout                   218.7k       0.21x wsgiref
WSGI, timeout=5                    315.6k       0.30x wsgiref
handler class                      652.5k       0.69x http.server
ASGI app                           401.2k       0.26x uvicorn
wsgiref / http.server / uvicorn    1.06M / 949.4k / 1.56M
data: URL (urllib floor)           238.2k
handler class alone (floor)        277.1k       0.29x http.server
Werkzeug test client               422.4k       (bridge WSGI: 0.52x)
httpx WSGITransport                721.9k       (bridge WSGI: 0.30x)
httpx ASGITransport                1.05M        (bridge ASGI: 0.38x)
wsgi-intercept                     444.8k       (bridge WSGI: 0.49x)
=================================  ===========  ======================

New openers (Ir/opener): ``build_opener()`` 2.51M, ``opener_for()`` 830.5k
(0.33x; it was 0.77x in time before it copied a prototype).

Targets
-------

From the first performance issue (absolute, set on a machine where W1 took
18.5 us for "WSGI, no timeout"): WSGI without a timeout W1/W2 <= 25 us and
>= 20x loopback, W3 >= 8,192 MiB/s, W4 <= 10 / 50 us, W5 >= 30,000/s; with
a timeout W1/W2 <= 90 us, W3 >= 4,096 MiB/s, W4 <= 40 / 150 us, W5 >=
10,000/s; a handler class W1/W2 <= 150 us and >= 4x loopback, W3 >= 3,072
MiB/s, W4 <= 40 / 150 us, W5 >= 6,000/s; <= 8 MiB of growth for 256 MiB on
every path.

From the second (ratios): a handler class <= 0.5x loopback's instructions
and >= 4x its time (W1, W2); ASGI >= 1.5x faster than httpx's ASGITransport
(W1, W2) and >= 3x (W3); WSGI with a timeout >= 8x loopback (W1); WSGI
without one <= 0.55x Werkzeug's instructions and <= 0.5x its time;
``opener_for()`` <= 5 % of ``build_opener()``.  The tables mark each met or
MISSED and print why beside each miss (``MISSES``):

- Handler class, instructions (0.69x) and time (2.6-2.8x; 3.2x pinned): not
  reachable with the handler unmodified.  The handler alone, served from
  memory in one thread with no urllib ("handler class alone" in
  ``--instructions``), is 0.29x loopback's instructions, and urllib's least
  cost for an in-process response (the WSGI column, app included) 0.23x:
  0.52x before a request line is written, a thread hop made or a head
  parsed.
- WSGI with a timeout, >= 8x: met pinned (8.7x), missed unpinned (5.3x):
  two hops are the floor and are what it has (the caller wakes once, for
  head and body together); unpinned, each costs ~30 us and cools the caches.
- ASGI against ASGITransport: met pinned (1.9x / 1.8x / 3.5x), missed
  unpinned (1.0x, 0.9x, 2.8x): ASGITransport runs the app in the caller's own
  event loop, with no hop, and buffers; the bridge must run it on the loop
  its mount owns, where the lifespan ran.
- WSGI against Werkzeug: 0.51x its instructions (met); 2.0-2.4x its time
  (met in most runs): Werkzeug's client has no HTTP client at all, while
  the bridge answers through urllib, whose own floor (a ``data:`` URL)
  costs about as much as the bridge's whole request.
- ``opener_for()``: 0.33x ``build_opener()``'s instructions on 3.11 (its
  time: 0.29x on 3.11, 0.6x on 3.8, 0.2 % on 3.13): met on 3.12+, missed
  before.  ``build_opener()`` reads the proxy environment for each opener
  (``urllib.request.getproxies()``: 60-100 us with 35 variables set) and so
  must ``opener_for()``, for a new opener to see ``*_proxy`` as a new
  ``build_opener()`` does; without that read it would be about a tenth.
- Memory: met on every path (0.33-1.33 MiB for 256 MiB).

Where the time goes, and what was done about it (each measured)
---------------------------------------------------------------

- A WSGI app without a timeout runs in the caller's thread and is pulled as
  the caller reads: no thread hop.  A one-chunk response is handed over as
  bytes and its iterable closed at once.
- A handler-class request up to 64 KiB is held until ``http.client`` has sent
  all of it and handed to the handler as one in-memory file: no request pipe,
  no hop per write.
- ``BodyPipe`` is a ``queue.SimpleQueue`` with a byte bound instead of a
  ``queue.Queue`` (whose three Conditions cost more than the rest of a small
  request's pipe work), and a reader takes every queued chunk per wake-up.
- Checked request headers are remembered (urllib sends the same ones every
  time), response headers go straight into the ``HTTPMessage``, and a plain
  response head from a handler class is read without http.client's
  email-based parser.
- ``opener_for()`` copies an opener ``build_opener()`` made once instead of
  running it again (``build_opener()`` asks each handler for its methods
  with ``dir()``), and its openers share one SSL context (3.12+ makes one
  per ``HTTPSHandler``: ~20-30 ms).

When these numbers change
-------------------------

Make three full ``--peers --json`` runs on a quiet machine (nothing else
running: a second process changes where the threads wake), and three pinned
ones, ``--summarize`` each set, and update the tables here and README.rst's
"Performance" table (W1, W2 and W3 per column with their ranges and ratios,
the floor row, and the instructions).  Count instructions at the same commit
with ``--instructions --jobs 2`` (and ``--record`` for the recording row).
"""

import argparse
import asyncio
import base64
import faulthandler
import functools
import gc
import hashlib
import http.server
import importlib.util
import io
import json
import os
import platform
import queue
import shlex
import shutil
import socketserver
import statistics
import subprocess
import sys
import tempfile
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
    next.  ``kinds`` says which of the two stdlib servers to start; the
    instruction counts start only the one they measure, with a longer
    ``poll_interval`` so that idle wake-ups (which come with wall-clock time,
    not with requests) stay out of the count."""

    def __init__(self, uvicorn=False, kinds=("wsgi", "handler"), poll_interval=0.05):
        self._servers = []
        self._threads = []
        self._uvicorn = None
        self._poll_interval = poll_interval
        self.wsgi_url = self.handler_url = self.asgi_url = None
        try:
            if "wsgi" in kinds:
                wsgi = wsgiref.simple_server.make_server(
                    "127.0.0.1", 0, wsgi_app,
                    server_class=_ThreadingWSGIServer, handler_class=_QuietWSGIRequestHandler)
                self._start(wsgi)
                self.wsgi_url = "http://127.0.0.1:%d" % wsgi.server_address[1]
            if "handler" in kinds:
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
        thread = threading.Thread(target=server.serve_forever,
                                  kwargs={"poll_interval": self._poll_interval},
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
        self.record = key.endswith(REC)  # served by the bridge built with record=True
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
# The recorded twins (--record): these columns again, key + REC, served by a
# second bridge built with record=True (and a second opener built the same
# way); the "recording costs" table sets each against its twin.
RECORDED = ("wsgi", "wsgi-t5", "handler", "asgi")
REC = "+rec"


def make_columns(uvicorn, record=False):
    """COLUMNS, with the ASGI column compared with wsgiref when there is no
    uvicorn (the standard library has no ASGI server), and with ``record``
    each recorded twin right after its column."""
    columns = []
    for key, label, app, timeout, base in COLUMNS:
        base = "wsgi-loop" if base == "asgi-loop" and not uvicorn else base
        columns.append((key, label, app, timeout, base))
        if record and key in RECORDED:
            columns.append((key + REC, label + ", record", app, timeout, base))
    return columns


def make_variants(columns, uvicorn):
    return ([Variant(key, label, app, timeout) for key, label, app, timeout, _ in columns]
            + [Variant(*spec) for spec in BASELINES if uvicorn or spec[0] != "asgi-loop"])


def make_bridge(record=False):
    """A bridge serving the apps (with ``record``, built with record=True)
    and an opener for it.  The first bridge's opener serves the loopback
    baselines too, so both sides pay for the same handler chain; an empty
    ProxyHandler keeps *_proxy variables off loopback."""
    bridge = inproc_bridge.InProcHandler({"api": wsgi_app, "h": BenchHandler}, record=record)
    return bridge, urllib.request.build_opener(urllib.request.ProxyHandler({}), bridge)


def bind_variants(variants, opener, rec_opener, servers):
    loop_base = {"wsgi": servers.wsgi_url, "handler": servers.handler_url,
                 "asgi": servers.asgi_url}
    for v in variants:
        if not v.peer and v.app != "floor":
            v.bind(rec_opener if v.record else opener,
                   (loop_base if v.key.endswith("-loop") else BRIDGE_BASE)[v.app])


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

    post = Client(wsgi_app).post

    def peer_w2(v, cfg, warm):
        n = _count(cfg, "w2_requests", warm)
        perf_counter = time.perf_counter
        start = perf_counter()
        for _ in range(n):
            with post("/echo", data=PAYLOAD) as resp:
                status = resp.status_code
                body = resp.get_data()
            if status != 200 or body != PAYLOAD:
                _fail(v, "POST /echo gave %r and %d bytes" % (status, len(body)))
        return {"W2.us": (perf_counter() - start) / n * 1e6}

    peer.funcs = {"W1": peer_w1, "W2": peer_w2, "W3": peer_w3}


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

    post = client.post

    def peer_w2(v, cfg, warm):
        n = _count(cfg, "w2_requests", warm)
        perf_counter = time.perf_counter
        start = perf_counter()
        for _ in range(n):
            resp = post("/echo", content=PAYLOAD)
            if resp.status_code != 200 or resp.content != PAYLOAD:
                _fail(v, "POST /echo gave %r and %d bytes"
                      % (resp.status_code, len(resp.content)))
        return {"W2.us": (perf_counter() - start) / n * 1e6}

    peer.funcs = {"W1": peer_w1, "W2": peer_w2, "W3": peer_w3}
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

    async def posts(v, n):
        async with client() as c:
            post = c.post
            perf_counter = time.perf_counter
            start = perf_counter()
            for _ in range(n):
                resp = await post("/echo", content=PAYLOAD)
                if resp.status_code != 200 or resp.content != PAYLOAD:
                    _fail(v, "POST /echo gave %r and %d bytes"
                          % (resp.status_code, len(resp.content)))
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

    def peer_w2(v, cfg, warm):
        n = _count(cfg, "w2_requests", warm)
        return {"W2.us": asyncio.run(posts(v, n)) / n * 1e6}

    def peer_w3(v, cfg, warm):
        size = cfg["w3_bytes"]
        return {"W3.mibs": size / MiB / asyncio.run(stream(v, size, warm))}

    peer.funcs = {"W1": peer_w1, "W2": peer_w2, "W3": peer_w3}


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
    peer.funcs = {"W1": w1, "W2": w2, "W3": w3}  # the bridge's own workloads: it is urllib too
    peer.close = close


# (key, label, app, distribution, factory)
PEERS = (
    ("peer-werkzeug", "peer: werkzeug test client", "wsgi", "werkzeug", _peer_werkzeug),
    ("peer-httpx-wsgi", "peer: httpx WSGITransport", "wsgi", "httpx", _peer_httpx_wsgi),
    ("peer-httpx-asgi", "peer: httpx ASGITransport", "asgi", "httpx", _peer_httpx_asgi),
    ("peer-wsgi-intercept", "peer: wsgi-intercept (urllib)", "wsgi", "wsgi-intercept",
     _peer_wsgi_intercept),
)
# The timed runs compare the peers on these; ``--instructions`` on W1 and W2.
PEER_WORKLOADS = ("W1", "W2", "W3")


def dist_version(dist):
    try:
        import importlib.metadata

        return importlib.metadata.version(dist)
    except Exception:
        return "?"


def make_peers(keys=None):
    """The peers that are importable and set up, and a note per peer skipped;
    only those in ``keys`` if given."""
    peers, notes = [], []
    for key, label, app, dist, factory in PEERS:
        if keys is not None and key not in keys:
            continue
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


class HopFloor(Variant):
    """Two threads and nothing else (W1 only): the caller hands a job to a
    thread waiting on a ``queue.SimpleQueue`` and waits on another for its
    answer -- the two thread hops a request to a worker or to the event
    loop must make, with no HTTP at all.  A floor, not a transport."""

    key = "hop-floor"

    def __init__(self):
        super().__init__(self.key, "floor: two-thread round trip", "floor", None)
        self.funcs = {"W1": self._w1}
        self._jobs = queue.SimpleQueue()
        self._answers = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="bench-hop-floor", daemon=True)
        self._thread.start()

    def _serve(self):
        get, put = self._jobs.get, self._answers.put
        while True:
            job = get()
            put(job)
            if job is None:
                return

    def _w1(self, v, cfg, warm):
        n = _count(cfg, "w1_requests", warm)
        put, get = self._jobs.put, self._answers.get
        perf_counter = time.perf_counter
        start = perf_counter()
        for i in range(n):
            put(i)
            if get() != i:
                _fail(v, "the round trip lost a job")
        return {"W1.us": (perf_counter() - start) / n * 1e6}

    def close(self):
        self._jobs.put(None)
        self._thread.join()


def build_floor_rows(samples, failures, cfg, only, floors):
    """A row per floor variant and metric it ran: its median, no baseline."""
    labels = _labels(cfg)
    rows = []
    for metric, workload, label, unit, higher, fmt in METRICS:
        for v in floors:
            rounds = samples.get(metric, {}).get(v.key, [])
            if workload not in only or workload not in v.funcs:
                continue
            failed = "%s %s" % (workload, v.key) in failures
            rows.append({"workload": workload, "metric": metric,
                         "label": label.format(**labels), "unit": unit,
                         "column": v.label, "column_key": v.key, "baseline": None,
                         "higher_is_better": higher, "format": fmt,
                         "bridge": statistics.median(rounds) if rounds and not failed else None,
                         "loopback": None, "ratio": None, "bridge_rounds": rounds,
                         "loopback_rounds": [], "target": None, "met": None,
                         "failed": failed})
    return rows


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
    variants = [v for v in variants if v.funcs is None
                or (name in v.funcs and (not v.peer or name in PEER_WORKLOADS))]
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


def check_journal(calls, failures):
    """The recording bridge's journal holds calls, each one complete with a
    200: a journal that missed or mislabelled requests would make recording
    look cheaper than it is.  A problem goes into ``failures``."""
    bad = [call for call in calls if call.outcome != "complete" or call.status != 200]
    if not len(calls):
        failures["record"] = "the journal of the bridge built with record=True is empty"
    elif bad:
        failures["record"] = ("%d of the %d calls in the journal are not complete with a 200,"
                              " e.g. %r" % (len(bad), len(calls), bad[0]))


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
    ("W1.us", "wsgi"): (25, 20), ("W1.us", "wsgi-t5"): (90, 8),
    ("W1.us", "handler"): (150, 4),
    ("W2.us", "wsgi"): (25, 20), ("W2.us", "wsgi-t5"): (90, None),
    ("W2.us", "handler"): (150, 4),
    ("W3.mibs", "wsgi"): (8192, None), ("W3.mibs", "wsgi-t5"): (4096, None),
    ("W3.mibs", "handler"): (3072, None),
    ("W3.peak", "wsgi"): (8, None), ("W3.peak", "wsgi-t5"): (8, None),
    ("W3.peak", "handler"): (8, None), ("W3.peak", "handler-t5"): (8, None),
    ("W3.peak", "asgi"): (8, None),
    ("W4.p50", "wsgi"): (10, None), ("W4.p99", "wsgi"): (50, None),
    ("W4.p50", "wsgi-t5"): (40, None), ("W4.p99", "wsgi-t5"): (150, None),
    ("W4.p50", "handler"): (40, None), ("W4.p99", "handler"): (150, None),
    ("W5.rps", "wsgi"): (30000, None), ("W5.rps", "wsgi-t5"): (10000, None),
    ("W5.rps", "handler"): (6000, None),
}

# (metric, peer, bridge column): how many times better than the peer the
# performance issue asks the bridge column to be ("x bridge" at least this).
PEER_TARGETS = {
    ("W1.us", "peer-werkzeug", "wsgi"): 2, ("W2.us", "peer-werkzeug", "wsgi"): 2,
    ("W1.us", "peer-httpx-asgi", "asgi"): 1.5, ("W2.us", "peer-httpx-asgi", "asgi"): 1.5,
    ("W3.mibs", "peer-httpx-asgi", "asgi"): 3,
}

WHY_HANDLER = (
    "a handler class runs unmodified: http.server parses its request with http.client's "
    "email-based header parser and it writes its own response.  That alone, in one thread "
    "with no urllib (the \"handler class alone\" row of --instructions), costs about 0.3x "
    "loopback's instructions, and urllib's least cost for any response (the \"WSGI, no "
    "timeout\" column, app included) about 0.23x: together over 0.5x before the bridge "
    "has moved a byte.  In time, the handler runs on a worker: two thread hops (the floor "
    "row), dearest when the two threads sit on different CPUs.")
WHY_HOPS = (
    "with a timeout the app runs on a worker, so that the caller's thread can keep the "
    "deadline: two thread hops per request, the least there can be (the caller wakes once, "
    "for the head and a small body together).  The floor row is those two hops alone; "
    "the rest of the time over the \"WSGI, no timeout\" column is the same work run on "
    "cold caches, the threads waking each other across CPUs.  Pinned to one CPU "
    "(taskset -c 0) the column meets the target.")
WHY_ASGI = (
    "httpx's ASGITransport runs the app in the caller's own event loop (no thread hop) "
    "and buffers the body.  A urllib caller is synchronous, so the bridge runs the app on "
    "the event loop its mount owns (where the lifespan ran and the app's loop-bound state "
    "lives), in another thread: two thread hops per request (the floor row) and the "
    "cold-cache work they bring.  Pinned to one CPU (taskset -c 0) the column meets the "
    "target.")
WHY_ASGI_STREAM = (
    "ASGITransport gathers the body in the caller's thread; the bridge streams it from the "
    "loop's thread with backpressure (at most PIPE_LIMIT in flight), a hop per batch of "
    "chunks, and resp.read(65536) copies every read.")
WHY_URLLIB = (
    "Werkzeug's client calls the app with no HTTP client at all; the bridge answers "
    "through urllib (Request, the opener's handler chain, http.client's HTTPResponse), "
    "whose own floor -- a data: URL through the same opener, in --instructions -- costs "
    "about as much as the bridge's whole WSGI request.")
WHY_OPENER = (
    "build_opener() reads the proxy environment for every opener "
    "(urllib.request.getproxies(): 60-100 us on 3.8-3.11 with 35 variables set), and "
    "opener_for() reads it too, so that a new opener sees *_proxy as a new build_opener() "
    "does.  Without that read it takes about a tenth of build_opener()'s time; on 3.12+, where "
    "build_opener() makes an SSL context per opener, opener_for() is under 1 % of it.")

# Why a target is missed, where that has been measured (the docstring's
# "Targets" section has the numbers): printed under a table that marks the
# target MISSED.  Keyed by (metric, column) or (metric, peer, column) in the
# timed tables, (workload, column, against) in --instructions.
MISSES = {
    ("W1.us", "handler"): WHY_HANDLER, ("W2.us", "handler"): WHY_HANDLER,
    ("W1.us", "wsgi-t5"): WHY_HOPS,
    ("W1.us", "peer-httpx-asgi", "asgi"): WHY_ASGI,
    ("W2.us", "peer-httpx-asgi", "asgi"): WHY_ASGI,
    ("W3.mibs", "peer-httpx-asgi", "asgi"): WHY_ASGI_STREAM,
    ("W1.us", "peer-werkzeug", "wsgi"): WHY_URLLIB,
    ("W2.us", "peer-werkzeug", "wsgi"): WHY_URLLIB,
    ("W1", "handler", "handler-loop"): WHY_HANDLER, ("W2", "handler", "handler-loop"): WHY_HANDLER,
    ("W1", "peer-httpx-asgi", "asgi"): WHY_ASGI, ("W2", "peer-httpx-asgi", "asgi"): WHY_ASGI,
    ("W1", "wsgi", "peer-werkzeug"): WHY_URLLIB, ("W2", "wsgi", "peer-werkzeug"): WHY_URLLIB,
    ("OP", "opener-for", "build-opener"): WHY_OPENER,
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
                    if min_ratio is not None and ok:
                        # No loopback (left out by --columns): not known, not missed.
                        ok = None if row["ratio"] is None else row["ratio"] >= min_ratio
                    row["met"] = ok
            rows.append(row)
    return rows


def build_peer_rows(samples, failures, cfg, only, peers):
    """A row per peer and metric: the peer against the bridge's "WSGI, no
    timeout" column, and an ASGI peer against the "ASGI app" column too
    (``-`` if ``--columns`` left it out)."""
    labels = _labels(cfg)
    column_label = {key: label for key, label, _, _, _ in COLUMNS}
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
                target = PEER_TARGETS.get((metric, peer.key, ref))
                rows.append({"workload": workload, "metric": metric,
                             "target": None if target is None else ">= %gx" % target,
                             "met": None if target is None or ratio is None else ratio >= target,
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
              "x bridge", "spread", "target", "")
    lines = []
    for row in rows:
        fmt = row["format"]
        value, b = row["value"], row["bridge"]
        if row["failed"]:
            mark = "FAILED"
        elif value is None:
            mark = "no data"
        elif row["met"] is not None:
            mark = "met" if row["met"] else "MISSED"
        else:
            mark = ""
        lines.append((row["label"], row["unit"], row["peer"],
                      "-" if value is None else fmt % value, row["column"],
                      "-" if b is None else fmt % b,
                      "-" if row["ratio"] is None else "%.1fx" % row["ratio"],
                      _spread(value, row["peer_rounds"]), row["target"] or "-", mark))
    _render(header, rows, lines, {3, 5, 6, 7})


def print_misses(missed):
    """Under a table: why each MISSED target there is missed, where MISSES
    knows (each reason once)."""
    reasons = []
    for key in missed:
        why = MISSES.get(key)
        if why and why not in reasons:
            reasons.append(why)
    for why in reasons:
        print()
        print(textwrap.fill("why missed: " + why, 80, subsequent_indent="  "))


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
            mark = "no loopback" if row["target"] else ""
        else:
            mark = "met" if row["met"] else "MISSED"
        lines.append((row["label"], row["unit"], row["column"],
                      "-" if b is None else fmt % b,
                      "-" if lo is None else fmt % lo,
                      "-" if row["ratio"] is None else "%.1fx" % row["ratio"],
                      spread, row["target"] or "-", mark))
    _render(header, rows, lines, {3, 4, 5, 6})


def build_record_rows(rows, metric, value):
    """The "recording costs" rows, from the rows of either mode's table: a
    row per metric and column whose recorded twin (``key + REC``) is there
    too.  ``metric`` and ``value``: the keys of a row's metric and of its
    median in that mode's rows."""
    twins = {(row[metric], row["column_key"]): row for row in rows}
    out = []
    for row in rows:
        twin = twins.get((row[metric], row["column_key"] + REC))
        if twin is None:
            continue
        a, b = row[value], twin[value]
        diff = b - a if a is not None and b is not None else None
        out.append({"workload": row["workload"], "metric": row[metric], "label": row["label"],
                    "unit": row["unit"], "column": row["column"],
                    "column_key": row["column_key"], "without": a, "with": b,
                    "difference": diff,
                    "percent": diff / a * 100 if diff is not None and a else None})
    return out


def print_record_table(rows, fmt):
    """The "recording costs" table; ``fmt(row, value, sign)`` formats a
    value of the row, with ``sign="+"`` a signed one."""
    header = ("workload", "unit", "column", "without", "with record", "difference", "%")
    lines = [(r["label"], r["unit"], r["column"], fmt(r, r["without"], ""),
              fmt(r, r["with"], ""), fmt(r, r["difference"], "+"),
              "-" if r["percent"] is None else "%+.1f%%" % r["percent"]) for r in rows]
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
# Instruction counts (--instructions): each column in a child process of its
# own under callgrind, once with N and once with 2N requests
# ---------------------------------------------------------------------------

INSTR_N = 200  # N: the children send N and 2N requests after the warm-up
INSTR_N_QUICK = 20
INSTR_WARMUP = 50
INSTR_WARMUP_QUICK = 10
# OP counts openers built, not requests: on CPython 3.13 one build_opener()
# is ~100x a request (an SSL context each), so it takes a smaller N.
INSTR_OPENERS = 20
INSTR_OPENERS_QUICK = 3
INSTR_WORKLOADS = ("W1", "W2", "OP")
INSTR_POLL = 1.0  # the loopback servers' idle wake-up, in the children
INSTR_CHILD_SECONDS = 3600.0  # a child still running after this is hung
DATA_URLS = {
    "W1": "data:text/plain;base64," + base64.b64encode(HELLO).decode("ascii"),
    "W2": "data:application/octet-stream;base64," + base64.b64encode(PAYLOAD).decode("ascii"),
}
INSTR_LABELS = {"W1": "W1 GET {w1_body} B", "W2": "W2 POST echo 1 KiB", "OP": "OP new opener"}
INSTR_UNITS = {"W1": "Ir/req", "W2": "Ir/req", "OP": "Ir/opener"}


def _data_w1(v, cfg, warm):
    open_ = v.open
    url = DATA_URLS["W1"]
    for _ in range(_count(cfg, "w1_requests", warm)):
        with open_(url) as resp:
            body = resp.read()
        if body != HELLO:
            _fail(v, "the data: URL gave %r" % (body[:64],))
    return {}


def _data_w2(v, cfg, warm):
    # The same Request as W2's (a body, so a POST); urllib's DataHandler
    # ignores the body and answers with the URL's 1 KiB.
    open_ = v.open
    url = DATA_URLS["W2"]
    for _ in range(_count(cfg, "w2_requests", warm)):
        with open_(url, PAYLOAD) as resp:
            body = resp.read()
        if body != PAYLOAD:
            _fail(v, "the data: URL gave %d bytes" % len(body))
    return {}


# What urllib sends for W1 and W2 (http.client's bytes, as the bridge hands
# them to a handler class): the "handler class alone" floor serves these.
_ALONE_REQUESTS = {
    "W1": (b"GET /hello HTTP/1.1\r\nAccept-Encoding: identity\r\nHost: h\r\n"
           b"User-Agent: Python-urllib/%d.%d\r\nConnection: close\r\n\r\n" % sys.version_info[:2]),
    "W2": (b"POST /echo HTTP/1.1\r\nAccept-Encoding: identity\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n"
           b"Host: h\r\nUser-Agent: Python-urllib/%d.%d\r\nConnection: close\r\n\r\n"
           % (len(PAYLOAD), *sys.version_info[:2]) + PAYLOAD),
}


class _MemorySocket:
    """A connection that holds one request and keeps what is written to it."""

    def __init__(self, request):
        self.request = request
        self.out = io.BytesIO()

    def makefile(self, mode, buffering=None, **_):
        return io.BytesIO(self.request) if "r" in mode else self.out

    def sendall(self, data):
        self.out.write(data)


class _AloneServer:
    server_name = "h"
    server_port = 80


def _handler_alone(workload, want):
    def run(v, cfg, warm):
        # BenchHandler as any server runs it (setup, handle, finish), on a
        # socket in memory, in this thread: no urllib, no http.client, no
        # thread hop -- the least any transport that runs it can cost.
        request = _ALONE_REQUESTS[workload]
        for _ in range(_count(cfg, "w1_requests" if workload == "W1" else "w2_requests", warm)):
            sock = _MemorySocket(request)
            BenchHandler(sock, ("127.0.0.1", 1), _AloneServer())
            out = sock.out.getvalue()
            if not out.startswith(b"HTTP/1.0 200 ") or not out.endswith(b"\r\n\r\n" + want):
                _fail(v, "the handler class wrote %r" % (out[:64],))
        return {}
    return run


def _openers_build(v, cfg, warm):
    build = urllib.request.build_opener
    for _ in range(_count(cfg, "openers", warm)):
        build()
    return {}


def _openers_factory(v, cfg, warm):
    opener_for = inproc_bridge.OpenerFactory({"api": wsgi_app}).opener_for
    for _ in range(_count(cfg, "openers", warm)):
        opener_for()
    return {}


def instruction_columns(uvicorn, peer_keys, record=False):
    """(key, label, kind, baseline key or None, workloads) for every column
    of the instruction table, with ``record`` the recorded twins too: kind is
    "bridge", "loopback", "floor", "peer" or "opener"; a peer's baseline is
    the bridge column it is compared with."""
    cols = [(key, label, "bridge", base, ("W1", "W2"))
            for key, label, _, _, base in make_columns(uvicorn, record)]
    cols += [(key, label + " *", "loopback", None, ("W1", "W2"))
             for key, label, _, _ in BASELINES if uvicorn or key != "asgi-loop"]
    cols.append(("data-url", "data: URL (urllib floor)", "floor", None, ("W1", "W2")))
    cols.append(("handler-alone", "handler class alone (floor)", "floor", None, ("W1", "W2")))
    for key, label, app, _, _ in PEERS:
        if key in peer_keys:
            cols.append((key, label, "peer", app if app == "asgi" else "wsgi", ("W1", "W2")))
    cols.append(("build-opener", "urllib.request.build_opener()", "opener", None, ("OP",)))
    cols.append(("opener-for", "OpenerFactory.opener_for()", "opener", "build-opener", ("OP",)))
    return cols


# (workload, column counted, column it is set against, "<=" or ">=", limit,
# text): the instruction targets of the performance issue.  The ratio is the
# first column's count over the second's.
_TARGETS_PER_WORKLOAD = (
    ("handler", "handler-loop", "<=", 0.5, "handler class <= 0.5x http.server loopback"),
    ("wsgi", "peer-werkzeug", "<=", 0.55, "WSGI, no timeout <= 0.55x werkzeug test client"),
    ("peer-httpx-asgi", "asgi", ">=", 1.5, "httpx ASGITransport >= 1.5x ASGI app"),
)
INSTR_TARGETS = (
    *((workload, *target) for target in _TARGETS_PER_WORKLOAD for workload in ("W1", "W2")),
    ("OP", "opener-for", "build-opener", "<=", 0.05, "opener_for() <= 0.05x build_opener()"),
)


def _file_sha256(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def instructions_child(spec, warmup):
    """The child mode: set up one column, warm it up with ``warmup``
    requests, send exactly K more, tear down and print a JSON line.  Exit
    status 0: done; 1: a check or the set-up failed; 3: a peer could not be
    set up (skipped)."""
    workload, key, k = spec.split(":")
    k = int(k)
    module = os.path.realpath(inproc_bridge.__file__)
    result = {"spec": spec, "module": module, "module_sha256": _file_sha256(module)}
    expected = os.environ.get("BENCH_INPROC_BRIDGE_FILE")
    if expected and expected != module:
        result["error"] = "imported %s, the parent measures %s" % (module, expected)
        print(json.dumps(result))
        return 1
    # One watchdog for the whole child: no watchdog thread per pass.
    faulthandler.dump_traceback_later(INSTR_CHILD_SECONDS, exit=True)
    bridge, opener = make_bridge(record=key.endswith(REC))
    servers = None
    peers = []
    status = 0
    try:
        specs = {key_: (label, app, timeout)
                 for key_, label, app, timeout, _ in make_columns(True, True)}
        specs.update((key_, (label, app, timeout)) for key_, label, app, timeout in BASELINES)
        if key in specs:
            v = Variant(key, *specs[key])
            if key.endswith("-loop"):
                servers = LoopbackServers(uvicorn=v.app == "asgi",
                                          kinds=(v.app,) if v.app != "asgi" else (),
                                          poll_interval=INSTR_POLL)
                base = {"wsgi": servers.wsgi_url, "handler": servers.handler_url,
                        "asgi": servers.asgi_url}[v.app]
            else:
                if v.app == "asgi":
                    bridge.mount("asgi", asgi_app)
                base = BRIDGE_BASE[v.app]
            v.bind(opener, base)
            func = WORKLOAD_FUNCS[workload]
        elif key == "data-url":
            v = Variant(key, "data: URL", "data", None)
            v.bind(opener, None)
            func = {"W1": _data_w1, "W2": _data_w2}[workload]
        elif key == "handler-alone":
            v = Variant(key, "handler class alone", "handler", None)
            func = _handler_alone(workload, HELLO if workload == "W1" else PAYLOAD)
        elif key in ("build-opener", "opener-for"):
            v = Variant(key, key, "opener", None)
            func = _openers_build if key == "build-opener" else _openers_factory
        else:
            peers, notes = make_peers({key})
            if not peers:
                result["skipped"] = notes[0] if notes else "%s: no such column" % key
                print(json.dumps(result))
                return 3
            v = peers[0]
            func = v.funcs[workload]
        if bridge.calls is not None:
            # Fill the journal first: then each counted request drops the
            # oldest call, as on a bridge that has been recording for a while.
            warmup = max(warmup, bridge.calls.limit)
        counts = ("w1_requests", "w2_requests", "openers")
        func(v, dict.fromkeys(counts, warmup), False)  # exactly `warmup` requests
        gc.collect()
        func(v, dict.fromkeys(counts, k), False)  # exactly k requests
        if bridge.calls is not None:
            problems = {}
            check_journal(bridge.calls, problems)
            if len(bridge.calls) != bridge.calls.limit:
                problems["record"] = "%d calls in the journal, want %d" % (
                    len(bridge.calls), bridge.calls.limit)
            if problems:
                raise BenchFailure(problems["record"])
    except Exception as exc:
        result["error"] = "%s: %s" % (type(exc).__name__, exc)
        status = 1
    finally:
        stop_bridge_workers(opener)
        bridge.close()
        close_peers(peers)
        if servers is not None:
            servers.close()
        faulthandler.cancel_dump_traceback_later()
    leftover = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if leftover and status == 0:
        result["error"] = "threads still running: %s" % ", ".join(leftover)
        status = 1
    print(json.dumps(result))
    return status


def callgrind_total(path):
    """The total Ir of a callgrind output file: its "totals:" line, or its
    "summary:" line in a file that has none.  One number: every thread of
    the process is in it (callgrind's default, no --separate-threads)."""
    totals = summary = None
    with open(path) as f:
        for line in f:
            if line.startswith("totals:"):
                totals = int(line.split()[1])
            elif line.startswith("summary:"):
                summary = int(line.split()[1])
    if totals is None and summary is None:
        raise ValueError("no totals: or summary: line in %s" % path)
    return totals if totals is not None else summary


def valgrind_info():
    """(path, version) of valgrind if it is installed and has callgrind, else
    (None, why not)."""
    exe = shutil.which("valgrind")
    if exe is None:
        return None, "valgrind is not installed (apt-get install valgrind)"
    try:
        out = subprocess.run([exe, "--tool=callgrind", "--version"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=60, text=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, "valgrind at %s does not run: %s" % (exe, exc)
    if out.returncode != 0:
        return None, "valgrind at %s has no callgrind: %s" % (exe, out.stdout.strip()[:200])
    return exe, out.stdout.strip()


def _run_child(valgrind, workload, key, k, warmup, outdir, env, tag):
    """One child under callgrind: (total Ir or None, the child's JSON result,
    seconds)."""
    out = os.path.join(outdir, "callgrind.%s.%s.%s.out" % (workload, key, tag))
    cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=" + out,
           "--trace-children=no", "--log-file=" + out[:-4] + ".log",
           sys.executable, os.path.abspath(__file__),
           "--instructions-child", "%s:%s:%d" % (workload, key, k),
           "--instructions-warmup", str(warmup)]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True,
                              timeout=INSTR_CHILD_SECONDS + 60, text=True)
    except subprocess.TimeoutExpired:
        return None, {"error": "no answer after %d s" % (INSTR_CHILD_SECONDS + 60)}, 0.0
    seconds = time.monotonic() - started
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"error": "exit status %d: %s" % (proc.returncode, tail)}
    result["returncode"] = proc.returncode
    if proc.returncode != 0:
        result.setdefault("error", "exit status %d" % proc.returncode)
        return None, result, seconds
    try:
        return callgrind_total(out), result, seconds
    except (OSError, ValueError) as exc:
        result["error"] = str(exc)
        return None, result, seconds


def _fmt_ratio(value):
    # Small ratios (OP's) keep three digits after the point.
    if value is None:
        return "-"
    return ("%.2fx" if value >= 0.1 else "%.3fx") % value


def _fmt_ir(value, sign=""):
    # sign="+": signed, for a difference.
    if value is None:
        return "-"
    if abs(value) >= 1e6:
        return ("%" + sign + ".2fM") % (value / 1e6)
    return ("%" + sign + ".1fk") % (value / 1e3)


def run_instructions(args, cfg, command, machine):
    """The ``--instructions`` mode: returns the exit status."""
    valgrind, version = valgrind_info()
    print("inproc_bridge %s benchmark: instructions per request (callgrind)"
          % machine["inproc_bridge"])
    print("command:  %s" % command)
    if valgrind is None:
        print("--instructions needs valgrind's callgrind: %s.  Nothing measured." % version)
        return 0
    with open(sys.executable, "rb") as f:
        if f.read(2) == b"#!":
            print("--instructions: %s is a script, not the interpreter; callgrind would count"
                  " the script's shell.  Run the benchmark with the real python." % sys.executable)
            return 2
    quick = args.quick
    n = args.instructions or (INSTR_N_QUICK if quick else INSTR_N)
    n_openers = INSTR_OPENERS_QUICK if quick else INSTR_OPENERS
    warmup = INSTR_WARMUP_QUICK if quick else INSTR_WARMUP
    rounds = args.rounds or 1
    module = os.path.realpath(inproc_bridge.__file__)
    module_sha = _file_sha256(module)
    uvicorn = uvicorn_available()
    peer_keys, peer_notes = set(), []
    for key, label, _, dist, _ in PEERS:
        if importlib.util.find_spec(dist.replace("-", "_")) is None:
            peer_notes.append("%s skipped: %s is not installed" % (label, dist))
        else:
            peer_keys.add(key)
    columns = instruction_columns(uvicorn, peer_keys, args.record)
    if args.columns:
        if _unknown_columns(args.columns, {
                c[0] for c in instruction_columns(True, {p[0] for p in PEERS}, True)}):
            return 2
        columns = [c for c in columns if c[0] in args.columns]
    only = args.only
    labels = _labels(cfg)

    print("machine:  %s; %s; %s CPUs (%s usable); load average %s"
          % (machine["platform"], machine["cpu"], machine["cpu_count"],
             machine["usable_cpus"], machine["load_average_at_start"]))
    print("python:   %s" % machine["python"])
    print("module:   %s (sha256 %s)" % (module, (module_sha or "?")[:16]))
    print("valgrind: %s at %s" % (version, valgrind))
    print("mode:     %s; N = %d requests (OP: N = %d openers), warm-up %d, %d round%s; "
          "workloads %s" % ("quick" if quick else "full", n, n_openers, warmup, rounds,
                            "" if rounds == 1 else "s", ",".join(only)))
    versions = {dist: dist_version(dist) for key, _, _, dist, _ in PEERS if key in peer_keys}
    if uvicorn:
        versions["uvicorn"] = dist_version("uvicorn")
    print("peers:    %s" % (", ".join("%s %s" % item for item in sorted(versions.items()))
                            or "none importable"))
    for note in peer_notes:
        print("          %s" % note)
    if not uvicorn:
        print("          uvicorn loopback skipped: uvicorn is not installed; the ASGI column"
              " is compared with wsgiref loopback")
    print()
    sys.stdout.flush()

    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"
    env["BENCH_INPROC_BRIDGE_FILE"] = module
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(module), env.get("PYTHONPATH")) if p)
    outdir = args.callgrind_dir or tempfile.mkdtemp(prefix="bench-callgrind-")
    os.makedirs(outdir, exist_ok=True)
    tasks = []
    for workload in only:
        k = n_openers if workload == "OP" else n
        for key, _, _, _, workloads in columns:
            if workload in workloads:
                for r in range(rounds):
                    for kk in (k, 2 * k):
                        tasks.append((workload, key, k, kk, r))
    counts = {}  # (workload, key) -> {"n": [...], "2n": [...]}
    failures, skipped, shas = {}, {}, set()
    started = time.monotonic()

    def one(task):
        workload, key, _, kk, r = task
        total, result, seconds = _run_child(valgrind, workload, key, kk, warmup, outdir, env,
                                            "%d.r%d" % (kk, r))
        print("[%d/%d %s %s K=%d: %s Ir in all, %.1f s%s]"
              % (tasks.index(task) + 1, len(tasks), workload, key, kk, _fmt_ir(total), seconds,
                 "; " + result["error"] if "error" in result else ""),
              file=sys.stderr, flush=True)
        return task, total, result, seconds

    try:
        if args.jobs > 1:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                done = list(pool.map(one, tasks))
        else:
            done = [one(task) for task in tasks]
    finally:
        if not args.callgrind_dir:
            shutil.rmtree(outdir, ignore_errors=True)
    for (workload, key, k, kk, _), total, result, _ in done:
        name = "%s %s" % (workload, key)
        if result.get("module_sha256"):
            shas.add(result["module_sha256"])
        if "skipped" in result:
            skipped[name] = result["skipped"]
        elif total is None:
            failures.setdefault(name, result.get("error", "failed"))
        else:
            half = "n" if kk == k else "2n"
            counts.setdefault((workload, key), {}).setdefault(half, []).append(total)
    elapsed = time.monotonic() - started

    # Per request: each round's (I(2N) - I(N)) / N; the median over rounds.
    per = {}
    rows = []
    label_of = {c[0]: c[1] for c in columns}
    for workload in only:
        k = n_openers if workload == "OP" else n
        for key, label, kind, base, workloads in columns:
            if workload not in workloads:
                continue
            name = "%s %s" % (workload, key)
            c = counts.get((workload, key), {})
            samples = [(b - a) / k for a, b in zip(c.get("n", []), c.get("2n", []))]
            value = None
            if samples and name not in failures:
                value = statistics.median(samples)
                per[(workload, key)] = value
            rows.append({"workload": workload, "label": INSTR_LABELS[workload].format(**labels),
                         "unit": INSTR_UNITS[workload], "column": label, "column_key": key,
                         "kind": kind, "baseline": base, "per_request": value,
                         "rounds": samples, "i_n": c.get("n", []), "i_2n": c.get("2n", []),
                         "n": k, "failed": failures.get(name), "skipped": skipped.get(name)})
    for row in rows:
        value = row["per_request"]
        base = per.get((row["workload"], row["baseline"])) if row["kind"] == "bridge" else None
        if row["kind"] == "opener" and row["baseline"]:
            base = per.get((row["workload"], row["baseline"]))
        floor = per.get((row["workload"], "data-url"))
        row["of_baseline"] = value / base if value and base else None
        row["of_floor"] = value / floor if value and floor and row["kind"] != "opener" else None

    header = ("workload", "unit", "column", "per req", "of loopback", "of data:", "spread", "")
    lines = []
    for row in rows:
        mark = ("FAILED" if row["failed"] else "skipped" if row["skipped"]
                else "no data" if row["per_request"] is None else "")
        lines.append((row["label"], row["unit"], row["column"], _fmt_ir(row["per_request"]),
                      _fmt_ratio(row["of_baseline"]), _fmt_ratio(row["of_floor"]),
                      _spread(row["per_request"], row["rounds"]), mark))
    table_rows = [dict(row, metric=row["workload"]) for row in rows]
    _render(header, table_rows, lines, {3, 4, 5, 6})
    print()
    print(textwrap.fill(
        "per req: (I(2N) - I(N)) / N, I = callgrind's instruction count of the whole child "
        "process, all threads (the caller, the bridge's worker and event-loop threads, and "
        "for * the loopback server and its per-connection threads, which run in the same "
        "process); kernel work (TCP, pipes, futexes) is not counted, so loopback's CPU cost "
        "is understated.  of loopback: the count over its loopback baseline's (WSGI columns: "
        "wsgiref, handler columns: http.server, ASGI: %s), for OP over build_opener()'s; "
        "of data:: over a data: URL opened through the same opener; spread: (max - min) / "
        "median over rounds." % ("uvicorn" if uvicorn else "wsgiref"), 80))

    record_rows = build_record_rows(rows, "workload", "per_request")
    if record_rows:
        print()
        print("Recording costs (record=True against the same column without it):")
        print_record_table(record_rows, lambda row, value, sign: _fmt_ir(value, sign))
        print()
        print(textwrap.fill(
            "without, with record: instructions per request as above; difference: with - "
            "without, %%: of without.  A recording child's warm-up first fills the journal "
            "(%d calls), so each counted request also drops the oldest call." %
            inproc_bridge.RECORD_LIMIT, 80))

    peer_rows = []
    for row in rows:
        if row["kind"] != "peer":
            continue
        bridge = per.get((row["workload"], row["baseline"]))
        value = row["per_request"]
        peer_rows.append({"workload": row["workload"], "label": row["label"],
                          "unit": row["unit"], "peer": row["column"],
                          "peer_key": row["column_key"], "peer_per_request": value,
                          "column": label_of.get(row["baseline"], row["baseline"]),
                          "column_key": row["baseline"], "bridge_per_request": bridge,
                          "bridge_over_peer": bridge / value if bridge and value else None})
    if peer_rows:
        print()
        header = ("workload", "unit", "in-process peer", "peer", "bridge column", "bridge",
                  "bridge/peer", "x fewer")
        lines = [(r["label"], r["unit"], r["peer"], _fmt_ir(r["peer_per_request"]),
                  r["column"], _fmt_ir(r["bridge_per_request"]),
                  "-" if r["bridge_over_peer"] is None else "%.2fx" % r["bridge_over_peer"],
                  "-" if r["bridge_over_peer"] is None else "%.1fx" % (1 / r["bridge_over_peer"]))
                 for r in peer_rows]
        _render(header, [dict(r, metric=r["workload"]) for r in peer_rows], lines, {3, 5, 6, 7})
        print()
        print("bridge/peer: the bridge column's instructions per request over the peer's;")
        print("x fewer: how many times fewer instructions the bridge column needs.")

    target_rows = []
    for workload, key, against, op, limit, text in INSTR_TARGETS:
        if workload not in only:
            continue
        a, b = per.get((workload, key)), per.get((workload, against))
        ratio = a / b if a and b else None
        why = None
        if ratio is None:
            for missing in (key, against):
                name = "%s %s" % (workload, missing)
                if (workload, missing) in per:
                    continue
                if missing not in label_of:
                    why = "%s not measured" % missing
                else:
                    why = "%s: %s" % (missing, failures.get(name) or skipped.get(name)
                                      or "no data")
                break
        met = None if ratio is None else (ratio <= limit if op == "<=" else ratio >= limit)
        target_rows.append({"workload": workload, "target": text, "column_key": key,
                            "against": against, "op": op, "limit": limit, "ratio": ratio,
                            "met": met, "why_no_data": why})
    if target_rows:
        print()
        header = ("workload", "target (instructions)", "measured", "")
        lines = [(r["workload"], r["target"], _fmt_ratio(r["ratio"]),
                  "no data: %s" % r["why_no_data"] if r["met"] is None
                  else "met" if r["met"] else "MISSED") for r in target_rows]
        _render(header, [dict(r, metric=None) for r in target_rows], lines, {2})
        print_misses([(r["workload"], r["column_key"], r["against"])
                      for r in target_rows if r["met"] is False])
    if any(r["against"] == "asgi" for r in target_rows):
        print()
        print(textwrap.fill(
            "The issue states the ASGI target as speed (>= 1.5x faster than httpx "
            "ASGITransport); here it is read as CPU work: httpx's instructions per request "
            "over the bridge ASGI column's.", 80))
    if quick:
        print("--quick: N = %d is a smoke test; counts are noisier than with the default N."
              % n)

    end_sha = _file_sha256(module)
    changed = end_sha != module_sha or any(s != module_sha for s in shas)
    if changed:
        print()
        print("WARNING: %s changed while the run was going on: the counts mix versions."
              % module)
    marks = [r["met"] for r in target_rows if r["met"] is not None]
    print("targets: %d met, %d missed; total %.1f s" % (marks.count(True), marks.count(False),
                                                        elapsed))
    if failures:
        print()
        print("FAILURES:")
        for key, why in sorted(failures.items()):
            print("  %s: %s" % (key, why))

    if args.json:
        result = {"command": command, "machine": machine, "mode": "instructions",
                  "quick": quick, "valgrind": version, "n": n, "n_openers": n_openers,
                  "warmup": warmup, "rounds": rounds, "workloads": only,
                  "module": {"path": module, "sha256": module_sha,
                             "changed_during_run": changed},
                  "peers": {"versions": versions, "notes": peer_notes},
                  "rows": rows, "record_rows": record_rows, "peer_rows": peer_rows,
                  "targets": target_rows,
                  "failures": failures, "skipped": skipped, "seconds": elapsed}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 1 if failures else 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _median_range(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = fmt % statistics.median(values)
    if len(values) > 1:
        text += " (%s-%s)" % (fmt % min(values), fmt % max(values))
    return text


def summarize(paths):
    """``--summarize``: the tables of several full runs' ``--json`` files
    as one, each cell the median of the runs' medians and, in parentheses,
    their range; a target is met in so many of the runs."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    formats = {metric: fmt for metric, *_, fmt in METRICS}
    if len({(run["mode"], json.dumps(run["config"], sort_keys=True)) for run in runs}) > 1:
        print("WARNING: these runs differ in mode or sizes; their cells do not compare.")
    print("%d runs:" % len(runs))
    for run in runs:
        print("  %s (%s; load average %s at start, %s at end)"
              % (run["command"], run["mode"], run["machine"].get("load_average_at_start"),
                 run.get("load_average_at_end")))
    for title, key_of, table in (
            ("bridge against loopback", lambda r: (r["metric"], r["column_key"]),
             lambda run: run["rows"]),
            ("bridge against the in-process peers",
             lambda r: (r["metric"], r["peer_key"], r["column_key"]),
             lambda run: run["peers"]["rows"])):
        cells = {}
        for run in runs:
            for row in table(run):
                cells.setdefault(key_of(row), []).append(row)
        if not cells:
            continue
        print()
        print(title + ":")
        if len(next(iter(cells))) == 2:
            header = ("workload", "column", "bridge", "loopback", "x loop", "target", "met")
            right = {2, 3, 4}
        else:
            header = ("workload", "peer", "bridge column", "peer", "bridge", "x bridge",
                      "target", "met")
            right = {3, 4, 5}
        rows, lines = [], []
        for key, found in cells.items():
            fmt = formats[key[0]]
            marks = [r["met"] for r in found if r["met"] is not None]
            met = "%d/%d" % (marks.count(True), len(marks)) if marks else "-"
            ratio = _median_range([r["ratio"] for r in found], "%.1fx")
            if len(key) == 2:
                lines.append((found[0]["label"], found[0]["column"],
                              _median_range([r["bridge"] for r in found], fmt),
                              _median_range([r["loopback"] for r in found], fmt), ratio,
                              found[0]["target"] or "-", met))
            else:
                lines.append((found[0]["label"], found[0]["peer"], found[0]["column"],
                              _median_range([r["value"] for r in found], fmt),
                              _median_range([r["bridge"] for r in found], fmt), ratio,
                              found[0]["target"] or "-", met))
            rows.append({"metric": key[0]})
        _render(header, rows, lines, right)
    print()
    print("each cell: the median of the runs' medians (their range); met: in how many runs")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="few rounds and small sizes (< 30 s): a smoke test")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="timed rounds per workload (default: %d, or %d with --quick)"
                        % (FULL["rounds"], QUICK["rounds"]))
    parser.add_argument("--only", metavar="W1,W3",
                        help="run only these workloads (of %s)" % ",".join(WORKLOADS))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="print the tables of several runs' --json files as one: the "
                        "median of their medians and the range")
    parser.add_argument("--peers", action="store_true",
                        help="also measure the in-process peers that are importable "
                        "(werkzeug, httpx, wsgi-intercept) on W1, W2 and W3")
    parser.add_argument("--record", action="store_true",
                        help="also measure %s again on a bridge built with record=True "
                        "(keys %s; naming one in --columns implies it) and report what "
                        "recording costs" % (", ".join(RECORDED),
                                             ",".join(key + REC for key in RECORDED)))
    parser.add_argument("--columns", metavar="KEY,KEY",
                        help="only these columns, baselines and peers (e.g. "
                        "wsgi,wsgi+rec,handler-loop,peer-werkzeug); a column's baseline "
                        "runs only if named")
    group = parser.add_argument_group(
        "instruction counts", "count instructions per request with valgrind's callgrind "
        "instead of timing (W1, W2 and OP, openers built; the peers are implied)")
    group.add_argument("--instructions", nargs="?", type=int, const=0, metavar="N",
                       help="run each column under callgrind with N and 2N requests and "
                       "report (I(2N) - I(N)) / N (default N: %d, or %d with --quick)"
                       % (INSTR_N, INSTR_N_QUICK))
    group.add_argument("--jobs", type=int, default=1, metavar="J",
                       help="children run side by side (default 1; counts do not depend "
                       "on it)")
    group.add_argument("--callgrind-dir", metavar="DIR",
                       help="keep callgrind's output files here (default: a temporary "
                       "directory, removed)")
    # The child mode that --instructions runs under callgrind: WORKLOAD:COLUMN:K.
    parser.add_argument("--instructions-child", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--instructions-warmup", type=int, default=INSTR_WARMUP,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.instructions is not None and args.instructions < 0:
        parser.error("--instructions N must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    instructions = args.instructions is not None
    allowed = INSTR_WORKLOADS if instructions else WORKLOADS
    if args.only:
        only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in only if w not in allowed]
        if unknown or not only:
            parser.error("--only takes a comma-separated list of %s%s"
                         % (",".join(allowed), " with --instructions" if instructions else ""))
        args.only = [w for w in allowed if w in only]
    else:
        args.only = list(allowed)
    if args.columns:
        args.columns = [c.strip() for c in args.columns.split(",") if c.strip()]
        args.record = args.record or any(c.endswith(REC) for c in args.columns)
    return args


def asgi_baseline(uvicorn):
    """What the ASGI column is compared with, for the header and the JSON."""
    if not uvicorn:
        return "wsgiref loopback (no ASGI server in the stdlib; uvicorn is not installed)"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return "uvicorn %s on 127.0.0.1 (%s %s)" % (dist_version("uvicorn"), http, dist_version(http))


def _unknown_columns(asked, known):
    """Print and return the ``--columns`` keys that are not in ``known``."""
    unknown = sorted(set(asked) - known)
    if unknown:
        print("--columns: unknown %s; known: %s" % (", ".join(unknown), ", ".join(sorted(known))))
    return unknown


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.summarize:
        return summarize(args.summarize)
    if args.instructions_child:
        return instructions_child(args.instructions_child, args.instructions_warmup)
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        cfg["rounds"] = args.rounds
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    machine = machine_info()
    if args.instructions is not None:
        return run_instructions(args, cfg, command, machine)
    uvicorn = uvicorn_available()
    columns = make_columns(uvicorn, args.record)
    variants = make_variants(columns, uvicorn)
    peer_keys = {key for key, *_ in PEERS}
    floor = "W1" in args.only and (not args.columns or HopFloor.key in args.columns)
    if args.columns:
        if _unknown_columns(args.columns, {key for key, *_ in make_columns(True, True)}
                            | {key for key, *_ in BASELINES} | peer_keys | {HopFloor.key}):
            return 2
        columns = [c for c in columns if c[0] in args.columns]
        variants = [v for v in variants if v.key in args.columns]
        peer_keys &= set(args.columns)
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
    if peer_keys and (args.peers or args.columns):  # naming a peer in --columns runs it
        if any(w in PEER_WORKLOADS for w in args.only):
            peers, peer_notes = make_peers(peer_keys)
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

    bridges = [make_bridge()]
    if any(v.record for v in variants):
        bridges.append(make_bridge(record=True))
    opener, rec_opener = bridges[0][1], bridges[-1][1]
    floors = [HopFloor()] if floor else []
    variants += peers + floors
    loops = {v.app for v in variants if v.key.endswith("-loop")}
    samples = {}
    failures = {}
    started = time.perf_counter()
    try:
        for bridge, _ in bridges:
            try:
                bridge.mount("asgi", asgi_app)  # starts its event loop, runs the lifespan
            except Exception as exc:
                failures["mount asgi"] = "%s: %s" % (type(exc).__name__, exc)
        for name in args.only:
            t0 = time.perf_counter()
            with LoopbackServers("asgi" in loops, tuple(loops - {"asgi"})) as servers:
                bind_variants(variants, opener, rec_opener, servers)
                run_workload(name, variants, cfg, samples, failures)
            print("[%s done in %.1f s]" % (name, time.perf_counter() - t0),
                  file=sys.stderr, flush=True)
    finally:
        _guarded(cfg["watchdog"], stop_bridge_workers, opener)
        for bridge, _ in bridges:
            _guarded(cfg["watchdog"], bridge.close)  # stops the ASGI event-loop thread
        close_peers(peers + floors)
    if len(bridges) > 1:
        check_journal(bridges[1][0].calls, failures)

    rows = build_rows(samples, failures, cfg, args.only, columns)
    order = [metric for metric, *_ in METRICS]
    rows = sorted(rows + build_floor_rows(samples, failures, cfg, args.only, floors),
                  key=lambda row: order.index(row["metric"]))  # each floor under its metric
    print_table(rows)
    print()
    print(textwrap.fill(
        "bridge/loopback: median over rounds; x loop: how many times better the bridge is "
        "than its loopback baseline in this run (WSGI columns: wsgiref, handler columns: "
        "http.server, ASGI column: %s); spread: (max - min) / median of the bridge's rounds."
        % ("uvicorn" if uvicorn else "wsgiref, as there is no stdlib ASGI server"), 80))
    if args.quick:
        print("--quick: sizes are smaller than the targets assume; treat marks as a smoke test.")
    missed = [row for row in rows if row["met"] is False]
    print_misses([(row["metric"], row["column_key"]) for row in missed])
    if any((row["metric"], row["column_key"]) not in MISSES for row in missed):
        print()
        print(textwrap.fill(
            "absolute limits (us, MiB/s, req/s) are the first performance issue's, set on "
            "a machine where W1 took 18.5 us for \"WSGI, no timeout\" (see \"Last full "
            "run\" in --help); on a slower machine, read the x loop ratios.", 80))
    record_rows = build_record_rows(rows, "metric", "bridge")
    if record_rows:
        formats = {metric: fmt for metric, *_, fmt in METRICS}
        print()
        print("Recording costs (record=True against the same column without it):")
        print_record_table(record_rows, lambda row, value, sign: "-" if value is None else
                           formats[row["metric"]].replace("%", "%" + sign) % value)
        print()
        print(textwrap.fill(
            "without, with record: the medians above, measured in the same rotated rounds; "
            "difference: with - without, %: of without.  For MiB/s and req/s the cost is a "
            "negative difference; a difference within the spread above is noise.", 80))
    peer_rows = build_peer_rows(samples, failures, cfg, args.only, peers)
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
        print_misses([(row["metric"], row["peer_key"], row["column_key"])
                      for row in peer_rows if row["met"] is False])
    try:
        load_end = "%.2f %.2f %.2f" % os.getloadavg()
    except (AttributeError, OSError):
        load_end = "n/a"
    marks = [row["met"] for row in rows + peer_rows if row["met"] is not None]
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
                  "record_rows": record_rows,
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
