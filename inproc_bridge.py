"""An in-process transport for ``urllib.request``: no socket, no port.

``opener.open("inproc://api/v1/chat")`` runs an HTTP app that lives in the same
process -- an unmodified ``http.server.BaseHTTPRequestHandler`` subclass, a
WSGI callable or an ASGI 3 app -- and hands back an ``http.client.HTTPResponse``
whose body streams chunk by chunk as the app produces it (SSE, NDJSON)::

    >>> import urllib.request, inproc_bridge
    >>> def app(environ, start_response):
    ...     start_response("200 OK", [("Content-Type", "text/plain")])
    ...     return [b"hello from ", environ["PATH_INFO"].encode()]
    >>> opener = urllib.request.build_opener(inproc_bridge.InProcHandler({"api": app}))
    >>> with opener.open("inproc://api/v1/chat") as resp:
    ...     print(resp.status, resp.read())
    200 b'hello from /v1/chat'

Everything urllib does for ``http://`` -- error statuses as ``HTTPError``,
redirects, cookies, auth handlers -- applies to ``inproc://`` too.  With
``intercept_http=True`` the bridge also serves ``http://`` and ``https://``
URLs whose host is a mount name; inside ``with intercept(apps):`` the whole
process does, for every urllib opener and ``http.client`` connection.
``OpenerFactory`` hands out openers that tag their requests with a call-site
``Source``; the app reads it with ``current_source()``.  For tests,
``record=`` keeps a journal of ``Call`` records and ``mount(..., fault=Fault(
...))`` injects faults; for production, ``drain()`` shuts down gracefully and
``mount(name, url, key=...)`` with ``trusted()`` on the far side moves an app
to a real server without changing its callers.  Run ``python -m
inproc_bridge`` for a self-test.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import email.utils
import errno
import functools
import hashlib
import hmac
import http.client
import http.server
import io
import logging
import os
import queue
import re
import socket
import socketserver
import string
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Union,
    cast,
)
from wsgiref.util import FileWrapper

__version__ = "0.2.0.dev0"

__all__ = [
    # urllib side
    "InProcHandler",
    "OpenerFactory",
    "BridgeError",
    # inside an app, while it serves a request
    "current_source",
    "current_actor",
    "cancelled",
    # call-site tags
    "Source",
    "SOURCE_AGENTS",
    # the body pipe
    "BodyPipe",
    # marks an ASGI app that detection would take for WSGI
    "ASGIApp",
    # the far side of a remote mount
    "trusted",
    # reach every urllib opener and http.client connection
    "intercept",
    # test doubles: the call journal and faults
    "Call",
    "Calls",
    "Fault",
]

_log = logging.getLogger(__name__)


# Theory of operation
# -------------------
#
# One request is one *exchange* (``_Exchange``), whatever the app kind.  The
# urllib side builds the request once (``_Request``: method, target, headers
# and body checked as http.client checks them), finds the mount, and hands
# both to the adapter of the app's kind -- a handler class, a WSGI app, an
# ASGI app.  An adapter speaks its app's protocol and nothing else: what the
# response *is* (its head checks and defaults, the 500 page, a late failure
# turned into the caller's read error, the caller leaving) is the exchange's
# alone, as wsgiref's ``BaseHandler`` sits over ``_write``.  Its state:
#
#     waiting --respond()--> streaming --finish()--> done
#        |                      |
#        +------fail()----------+--> failed   (500 page, or the reader's error)
#        +--leave() / abort()---+--> left     (the caller, or the server, hung up)
#
# ``_NEXT`` holds the transitions; ``_Exchange._to`` is the only place the
# state changes.  The response travels on one of three channels:
#
# * a handler class writes raw HTTP into a ``BodyPipe`` that http.client
#   reads on the caller's side, as from a socket (``raw``);
# * a WSGI app given a timeout and every ASGI app run elsewhere: the head
#   goes through a one-shot ``_HeadSlot`` (which has its own timeout), the
#   body through a ``BodyPipe`` (``slot``);
# * a WSGI app with no timeout runs in the caller's thread, as Werkzeug's
#   test client runs one: the caller pulls its iterable as it reads, and no
#   thread hop happens at all (``inline``).
#
# Threads and their owners.  Handler classes and timed WSGI apps run on the
# module's pool of daemon workers (``_workers``); ASGI apps run as tasks on
# an event loop in a daemon thread that the mount table owns (one per
# ``InProcHandler`` or ``OpenerFactory``, started on first use, stopped by
# ``close()``).  The caller's thread never runs the loop.  After ``fork()``
# the pool, the locks and the loops start afresh in the child, and an
# exchange begun before it fails at once there (``_fork_generation``).
#
# Pipe ends.  The app's side writes a response pipe and closes its writing
# end (``close_writer``, maybe with the error the reader must raise); the
# caller's response object owns the reading end and is the only one to
# close it.  A request body that is not all in memory streams the other way
# through a second pipe that only the caller's thread writes, so nothing but
# the caller's thread ever touches the caller's body object.
#
# How "the caller left" travels.  Closing the response (or dropping it, or
# its timeout passing) closes the reading end; the pipe calls the exchange's
# ``leave()``, which sets ``cancelled()``, makes the app's next write raise
# ``BrokenPipeError`` and, for ASGI, wakes ``receive()`` with
# ``http.disconnect``.  ``abort(error)`` is the same seen from the server's
# side (a closing bridge): the caller also gets ``error``.
#
# What runs in the caller's thread, and why: the request checks, urllib's
# processors, feeding a streamed request body (backpressure on the caller's
# own producer), waiting for the head, and -- with no timeout to keep -- a
# WSGI app itself, because a thread hop costs more than a small request.
#
# Built on the exchange, once for every kind: the call journal (a Call the
# transitions fill in), faults (every body byte passes _Exchange.account),
# drain (each mount table knows its exchanges in flight and cancels them
# with abort()), remote mounts (one more adapter: the caller's thread sends
# the request over the network, a worker pumps the body into the pipe) and
# intercept() (class-level patches of urllib's HTTP handlers and
# http.client's connect() that route mounted hosts to a bridge).

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: Bytes a pipe holds before its writer blocks.  One MiB keeps a fast app a
#: few chunks ahead of its reader without letting memory grow with the body.
PIPE_LIMIT = 1 << 20

#: What a handler class sees as ``client_address`` and a WSGI app as
#: ``REMOTE_ADDR``.
CLIENT_ADDRESS = ("127.0.0.1", 0)

#: Seconds an idle worker thread waits for a new request before it exits.
WORKER_IDLE_SECONDS = 10.0

#: Seconds an ASGI app gets to finish its lifespan startup (``mount`` raises
#: ``BridgeError`` after that) or its lifespan shutdown (``unmount`` and
#: ``close`` go on after that).
LIFESPAN_TIMEOUT = 60.0

#: Seconds ``close()`` gives the ASGI requests and tasks it cancels to end.
ASGI_CLOSE_GRACE = 5.0

_DEFAULT_PORTS = {"http": 80, "https": 443}

# What wsgiref answers when an app fails before responding.
_ERROR_STATUS = "500 Internal Server Error"
_ERROR_BODY = b"A server error occurred.  Please contact the administrator."

# A request up to this size is held until http.client has sent all of it and
# handed to a handler class as one in-memory file: no request pipe, no hop
# per write.  A larger or longer one streams through a BodyPipe.
_HOLD_LIMIT = 1 << 16

# Request body bytes one ASGI http.request message carries at most; bytes a
# pipe read joins into one chunk at most.
_RECEIVE_LIMIT = 1 << 16

# RFC 9110 token characters for header names; values may not carry control
# characters other than tab (http.client itself refuses only line breaks, so
# the bridge checks requests on both paths with these), nor, in a WSGI app's
# head, characters beyond latin-1 (PEP 3333), which no wire carries: a
# handler class's send_header() raises on them, wsgiref sends a broken head.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile("[\x00-\x08\x0a-\x1f\x7f\u0100-\U0010ffff]")
_BAD_URL_CHAR = re.compile("[\x00-\x20\x7f]")
_BAD_METHOD_CHAR = re.compile("[\x00-\x1f]")
_STATUS = re.compile("[1-9][0-9]{2} [^\r\n\x00\u0100-\U0010ffff]*")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]@/?#\s]+)(?::([0-9]*))?")
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)

# ---------------------------------------------------------------------------
# Exceptions, call-site tags and the per-request context
# ---------------------------------------------------------------------------


class BridgeError(urllib.error.URLError):
    """A request the bridge cannot serve: unknown mount name, bad host, or a
    factory with nothing mounted.  A ``URLError``, so code that handles
    urllib's errors handles it too."""


class Source(str):
    """Names the call site a request came from (``"agents"``, ``"billing"``).

    A ``str`` subclass so it logs and compares as text; the app reads it with
    ``current_source()`` or ``environ["inproc.source"]``.  It travels out of
    band, never as a header, so a caller cannot forge it.
    """

    __slots__ = ()


SOURCE_AGENTS = Source("agents")

# Guards the exchanges' state and their lazily made events: held for a few
# instructions at a time, so one lock for all of them costs nothing.
_LOCK = threading.Lock()
_exchange: contextvars.ContextVar[Optional[_Exchange]] = contextvars.ContextVar(
    "inproc_bridge_exchange", default=None
)


def current_source() -> Optional[Source]:
    """The ``Source`` of the request being served, or ``None`` (no source
    given, or not called from inside an app)."""
    exchange = _exchange.get()
    return exchange.source if exchange is not None else None


def current_actor() -> Any:
    """The actor given to ``opener_for``/``InProcHandler`` for the request
    being served, or ``None``."""
    exchange = _exchange.get()
    return exchange.actor if exchange is not None else None


def cancelled() -> threading.Event:
    """An event that is set once the caller is gone: it closed or dropped the
    response, or its ``timeout`` passed.  Raises ``RuntimeError`` outside a
    request served by the bridge."""
    exchange = _exchange.get()
    if exchange is None:
        raise RuntimeError("cancelled() called outside a request served by inproc_bridge")
    return exchange.event()


def _effective_timeout(timeout: Any) -> Optional[float]:
    if timeout is socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
        return socket.getdefaulttimeout()
    return timeout  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------
# The pipe
# ---------------------------------------------------------------------------


class _ChunkReader(io.RawIOBase):
    """A raw reader over chunks that a subclass produces one at a time
    (``_next_chunk``): the one ``readinto``/``readall`` of the pipe, the
    caller's streamed request body and a WSGI iterable pulled in the
    caller's thread."""

    _chunk = memoryview(b"")  # what is left of the current chunk

    def readable(self) -> bool:
        return True

    def _next_chunk(self, want: int) -> Optional[bytes]:
        """The next non-empty chunk (``want`` is a hint), ``None`` at the end."""
        raise NotImplementedError

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if not len(view):
            return 0
        chunk = self._chunk
        if not len(chunk):
            data = self._next_chunk(len(view))
            if data is None:
                return 0
            chunk = memoryview(data)
        n = min(len(view), len(chunk))
        view[:n] = chunk[:n]
        self._chunk = chunk[n:]
        return n

    def readall(self) -> bytes:
        parts = [self._chunk.tobytes()] if len(self._chunk) else []
        self._chunk = memoryview(b"")
        while True:
            data = self._next_chunk(PIPE_LIMIT)
            if data is None:
                return b"".join(parts)
            parts.append(data)


class _Chunks:
    """What lies between a ``BodyPipe``'s two ends: a ``queue.SimpleQueue``
    of ``bytes`` chunks, bounded by their total length (the bound holds
    whatever size the writer's chunks are) with a gate the writer waits at.

    A ``queue.Queue`` builds three Conditions per queue, which cost more than
    all the rest of a small request's pipe (each raises and catches three
    AttributeErrors on 3.8 to 3.12); the C ``SimpleQueue`` hands a chunk
    over with one lock.  Items are bytes only: the end of the stream is an
    empty chunk (a zero-length write is no item), and how it ended is state
    (``error``).  ``wake`` is armed by an event loop's end, which never
    blocks: the other end calls it after its next put, get or end."""

    __slots__ = ("limit", "level", "ended", "error", "broken", "reader_gone", "wake", "_items",
                 "_lock", "_gate", "_eof")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.level = 0  # bytes queued
        self.ended = False
        self.error: Optional[BaseException] = None  # the reader raises it after the bytes
        self.broken = False  # the reader closed, or the stream was cut: no more puts
        self.reader_gone = False
        self.wake: Optional[Callable[[], None]] = None
        self._items: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._lock = threading.Lock()  # level, the flags and the gate
        self._gate: Optional[threading.Lock] = None  # held; a blocked writer waits on it
        self._eof = False  # the reader took the end (the reader's own)

    def _poke(self) -> None:
        wake = self.wake
        if wake is not None:
            self.wake = None
            wake()

    def _open_gate(self) -> None:
        # With the lock held.
        gate = self._gate
        if gate is not None:
            self._gate = None
            gate.release()

    # -- the writer's end ---------------------------------------------------

    def _room(self, timeout: Optional[float]) -> None:
        # With the lock held: return once the chunk may go in.
        while self.level >= self.limit and not self.broken:
            gate = self._gate = threading.Lock()
            gate.acquire()
            self._lock.release()
            try:
                opened = gate.acquire(True, -1 if timeout is None else timeout)
            finally:
                self._lock.acquire()
            if not opened:
                self._gate = None
                raise socket.timeout("timed out")
        if self.broken:
            raise BrokenPipeError(errno.EPIPE, "the reading end of the pipe is closed")

    def put(self, data: bytes, timeout: Optional[float]) -> None:
        """Queue ``data`` (not empty), waiting while the pipe is full."""
        with self._lock:
            self._room(timeout)
            self.level += len(data)
            self._items.put(data)
        self._poke()

    def try_put(self, data: bytes) -> bool:
        """``put`` that never waits: False while the pipe is full."""
        with self._lock:
            if self.level >= self.limit and not self.broken:
                return False
            self._room(None)
            self.level += len(data)
            self._items.put(data)
        return True

    def end(self, error: Optional[BaseException], broken: bool = False) -> None:
        """The writer is done (``error``: what the reader raises after the
        bytes); ``broken`` also fails the writer's next put."""
        with self._lock:
            if not self.ended:
                self.ended = True
                self.error = error
                self._items.put(b"")
            elif broken and error is not None and not self.reader_gone:
                self.error = error  # cut after a clean end: the reader still raises
            if broken:
                self.broken = True
                self._open_gate()
        self._poke()

    # -- the reader's end ---------------------------------------------------

    def get(self, timeout: Optional[float]) -> bytes:
        """Queued bytes (what waits, joined up to _RECEIVE_LIMIT: a reader
        that wakes takes it all, not one chunk per hop); ``b""`` at the end;
        ``queue.Empty`` when ``timeout`` passes first."""
        if self._eof:
            return b""
        items = self._items
        data = items.get(True, timeout)
        if data and items.qsize() and len(data) < _RECEIVE_LIMIT:
            parts = [data]
            size = len(data)
            while size < _RECEIVE_LIMIT and items.qsize():
                part = items.get_nowait()
                if not part:
                    self._eof = True
                    break
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        if not data:
            self._eof = True
            return data
        with self._lock:
            self.level -= len(data)
            if self.level < self.limit:
                self._open_gate()
        self._poke()
        return data

    def ready(self) -> bool:
        """Whether ``get`` would return at once."""
        return self._eof or bool(self._items.qsize())

    @property
    def drained(self) -> bool:
        """The writer ended cleanly and only the end is left (or taken)."""
        return self.ended and self.error is None and (self._eof or self._items.qsize() <= 1)

    def discard(self, error: BaseException) -> bool:
        """See ``BodyPipe.discard``."""
        with self._lock:
            dropped = False
            while self._items.qsize():
                try:
                    dropped = bool(self._items.get_nowait()) or dropped
                except queue.Empty:  # the reader took it first
                    break
            if not dropped or self._eof:
                if not self._eof:
                    self._items.put(b"")  # the end taken out with the rest
                return False
            self.level = 0
            self.error = error
            self.broken = self.ended = True
            self._items.put(b"")
            self._open_gate()
        return True

    def drop_reader(self) -> None:
        with self._lock:
            self.broken = self.ended = self.reader_gone = True
            self.level = 0
            self._open_gate()
        self._poke()


class BodyPipe(_ChunkReader):
    """A one-way byte pipe between two threads, backed by a queue of chunks
    (the ``queue`` module's ``SimpleQueue``).

    The writer calls ``write()`` and ends with ``close_writer()`` -- or
    ``close_writer(error)``, which the reader raises once it has read the
    bytes written before it.  The reader uses it as any raw binary file
    (``read``, ``readinto``, ``readall``; wrap it in ``io.BufferedReader`` for
    ``readline``).

    * Bounded: ``write()`` blocks while ``limit`` bytes wait unread, so a slow
      reader holds a fast writer back.  Immutable ``bytes`` chunks pass by
      reference; other buffers are copied once, as ``socket.send`` would.
    * A zero-length write is a no-op, not end of stream.
    * ``read_timeout``/``write_timeout`` (seconds, ``None`` = wait forever)
      make a blocked call raise ``socket.timeout``; after a read times out the
      pipe refuses further reads, as a socket file does.
    * ``close()`` is the reader's: it is idempotent, discards what is queued,
      calls ``on_close`` once, and makes the writer's next (or blocked)
      ``write()`` raise ``BrokenPipeError``.
    * ``abort(error)`` cuts the stream from outside, as a dropped connection:
      the reader gets ``error`` after what was written, the writer's next
      ``write()`` raises ``BrokenPipeError``.
    """

    def __init__(
        self,
        limit: int = PIPE_LIMIT,
        *,
        read_timeout: Optional[float] = None,
        write_timeout: Optional[float] = None,
        on_close: Optional[Callable[[], None]] = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1 byte")
        super().__init__()
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self._queue = _Chunks(limit)
        self._writer_done = False
        self._timed_out = False
        self._on_close = on_close
        self._generation = _fork_generation

    # -- writer side --------------------------------------------------------

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        """Queue ``b`` for the reader; return its length.  Blocks while the
        pipe is full; ``BrokenPipeError`` once the reader has closed."""
        data = b if type(b) is bytes else memoryview(b).tobytes()
        if self._writer_done:
            raise ValueError("write to a pipe whose writer has finished")
        if self._generation != _fork_generation:
            raise _forked_away()
        if data:
            self._queue.put(data, self.write_timeout)
        return len(data)

    def close_writer(self, error: Optional[BaseException] = None) -> None:
        """End the stream: the reader gets EOF, or ``error`` raised after the
        bytes before it.  Never blocks; idempotent; a no-op once the reader
        has closed."""
        if self._writer_done:
            return
        self._writer_done = True
        if self._generation == _fork_generation:  # else nobody in this process reads it
            self._queue.end(error)

    def abort(self, error: Optional[BaseException]) -> None:
        """Cut the stream as a dropped connection does (any thread; never
        blocks): see the class docstring.  With ``error=None`` the reader
        gets EOF after what was written."""
        if self._generation == _fork_generation:
            self._queue.end(error, broken=True)

    def discard(self, error: BaseException) -> bool:
        """Throw away what waits unread and make the next read raise
        ``error`` (any thread; drain's cut of a finished stream).  False when
        nothing was waiting: the reader had it all."""
        if self._generation != _fork_generation:
            return False
        return self._queue.discard(error)

    @property
    def reader_closed(self) -> bool:
        """True once the reader has closed its end."""
        return self._queue.reader_gone

    @property
    def timed_out(self) -> bool:
        """True once a read has timed out."""
        return self._timed_out

    # -- reader side --------------------------------------------------------

    def _next_chunk(self, want: int) -> Optional[bytes]:
        if self.closed:
            raise ValueError("read from a closed pipe")
        if self._timed_out:
            raise OSError("cannot read from timed out object")
        if self._generation != _fork_generation:
            raise _forked_away()
        try:
            data = self._queue.get(self.read_timeout)
        except queue.Empty:
            self._timed_out = True
            raise socket.timeout("timed out") from None
        if data:
            return data
        if self._queue.error is not None:
            raise self._queue.error
        return None

    def close(self) -> None:
        """Close the reading end (idempotent): the writer's next write raises
        ``BrokenPipeError``."""
        if self.closed or not hasattr(self, "_queue"):  # __init__ may have refused its args
            super().close()
            return
        on_close, self._on_close = self._on_close, None
        self._chunk = memoryview(b"")
        if self._generation == _fork_generation:
            # (Made before fork(), its lock may be held by a thread that does
            # not exist here, and no writer here waits on it.)
            self._queue.drop_reader()
            if on_close is not None:
                on_close()
        super().close()


class _HeadSlot:
    """The one-shot hand-over of a response head (or of the error that takes
    its place) from the app's thread to the caller, with its own timeout."""

    __slots__ = ("_ready", "_value")

    def __init__(self) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()
        self._value: Any = None

    def put(self, value: Any) -> None:
        self._value = value
        self._ready.release()

    def take(self, timeout: Optional[float]) -> Any:
        if not self._ready.acquire(timeout=-1 if timeout is None else timeout):
            raise socket.timeout("timed out")
        return self._value

# ---------------------------------------------------------------------------
# Worker threads
# ---------------------------------------------------------------------------


class _Slot:
    __slots__ = ("wake", "job", "ident")

    def __init__(self) -> None:
        self.ident = threading.get_ident()
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: Optional[Callable[[], None]] = None


class _Workers:
    """Daemon threads that run apps off the caller's thread; the module owns
    the one pool.  A thread costs ~130 us to start and join here, so idle ones
    are kept (LIFO, the warmest first) and exit after ``WORKER_IDLE_SECONDS``.
    The pool grows without bound: a nested in-process call made from inside
    an app never waits for a worker that cannot come."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: List[_Slot] = []

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            slot = self._idle.pop() if self._idle else None
        if slot is None:
            thread = threading.Thread(
                target=self._run, args=(job,), name="inproc_bridge-worker", daemon=True
            )
            # An empty context, whoever asked first: where threads inherit
            # their starter's context (3.14's thread_inherit_context) the
            # pool must not keep the first request's.  Each job runs in its
            # own request's context anyway.
            contextvars.Context().run(thread.start)
        else:
            slot.job = job
            # A bare lock is the cheapest cross-thread wake-up CPython has.
            slot.wake.release()

    def _run(self, job: Callable[[], None]) -> None:
        slot = _Slot()
        while True:
            try:
                job()
            except BaseException:  # noqa: BLE001 - a worker must survive its job
                _log.exception("inproc_bridge worker job failed")
            job = None  # type: ignore[assignment]
            with self._lock:
                self._idle.append(slot)
            if not slot.wake.acquire(timeout=WORKER_IDLE_SECONDS):
                with self._lock:
                    if slot in self._idle:
                        self._idle.remove(slot)
                        return
                # submit() took this slot just as the wait ran out.
                slot.wake.acquire()
            job, slot.job = slot.job, None  # type: ignore[assignment]

    def idle(self) -> List[int]:
        """Thread idents of the workers waiting for a job (for tests)."""
        with self._lock:
            return [slot.ident for slot in self._idle]


_workers = _Workers()

# fork() copies only the thread that called it: in the child, the workers,
# the ASGI loops' threads and whatever app was writing into a pipe are gone,
# and a lock one of them held stays held.  The child's first request must
# not wait for them, so after fork the pool, the module's locks and every
# ASGI loop start afresh, and a pipe made before the fork (it remembers the
# generation) fails its reader and writer at once instead of waiting forever.
_fork_generation = 0
_loops: weakref.WeakSet[_ASGILoop] = weakref.WeakSet()
_tables: weakref.WeakSet[_Mounts] = weakref.WeakSet()
_journals: weakref.WeakSet[Calls] = weakref.WeakSet()


def _forked_away() -> ConnectionResetError:
    return ConnectionResetError(
        errno.ECONNRESET, "this in-process exchange began before fork(): its app's thread is not "
        "in this process")


def _after_fork_in_child() -> None:
    global _fork_generation, _workers, _LOCK, _BLOCKS_LOCK
    _fork_generation += 1
    _workers = _Workers()
    _LOCK = threading.Lock()
    _BLOCKS_LOCK = threading.Lock()  # intercept(): the blocks themselves came along
    for table in list(_tables):
        table.after_fork()
    for journal in list(_journals):
        journal.after_fork()
    for runner in list(_loops):
        runner.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# ---------------------------------------------------------------------------
# The exchange: one request's life on the response side, for every app kind
# ---------------------------------------------------------------------------

_Head = Tuple[int, str, List[Tuple[str, str]]]

_WAITING, _STREAMING, _DONE, _FAILED, _LEFT = "waiting", "streaming", "done", "failed", "left"

#: Where each state may go.  Only ``abort`` and ``fail`` ask where it came from.
_NEXT: Dict[str, Tuple[str, ...]] = {
    _WAITING: (_STREAMING, _FAILED, _LEFT),
    _STREAMING: (_DONE, _FAILED, _LEFT),
    _DONE: (_LEFT,),  # the caller closed a complete response: cancelled() is set
    _FAILED: (_LEFT,),
    _LEFT: (),
}

#: Head rules that differ by app kind, as the servers they stand for differ:
#: PEP 3333 forbids hop-by-hop headers from a WSGI app (wsgiref refuses
#: them); uvicorn frames an ASGI app's response by the headers it sends.
_HOP_BY_HOP_ALLOWED = {"WSGI": False, "ASGI": True}


def _failure(name: str, when: str, exc: BaseException) -> ConnectionResetError:
    """The error a reader gets when the app failed mid-response."""
    err = ConnectionResetError(
        errno.ECONNRESET,
        "in-process app %r failed %s: %s" % (name, when, _describe(exc)),
    )
    err.__cause__ = exc
    return err


def _log_app_error(exchange: _Exchange, when: str, exc: BaseException) -> None:
    if exchange.state == _LEFT and isinstance(exc, OSError):
        # The caller left and the app's next write said so: the normal way a
        # streaming app learns it, not a fault.
        # (The record holds text, not exc: a kept record must not keep the
        # app's frames, and what they hold, alive.)
        _log.debug("app %r stopped after its caller left: %s", exchange.name, _describe(exc))
        return
    _log.error(
        "in-process app %r raised %s (source=%s, actor=%r)",
        exchange.name,
        when,
        exchange.source,
        exchange.actor,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"inproc_source": exchange.source, "inproc_actor": exchange.actor},
    )


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - the error still has to reach the caller
        text = "<str() failed>"  # as a traceback shows it
    return "%s: %s" % (type(exc).__name__, text)


_date_cache: List[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[1] = email.utils.formatdate(now, usegmt=True)
        _date_cache[0] = now
    return _date_cache[1]  # type: ignore[no-any-return]


def _header_field(name: str, value: str, kind: str, shown: Any) -> Tuple[str, str]:
    """One header of a WSGI or ASGI app's head as the caller will see it,
    checked by the rules every kind shares (``shown`` goes in the error)."""
    if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
        raise ValueError("invalid %s response header %r" % (kind, shown))
    if not _HOP_BY_HOP_ALLOWED[kind] and name.lower() in _HOP_BY_HOP:
        raise ValueError("hop-by-hop header %r not allowed from a %s app" % (name, kind))
    # As the caller would see it after http.client parsed it off the wire:
    # leading spaces and tabs go, trailing ones stay (Django's Set-Cookie
    # values start with a space).
    return name, value.lstrip(" \t") if value[:1] in (" ", "\t") else value


class _Exchange:
    """One request, from the app's first step to the caller's last read.

    It holds what an app may learn out of band (``name``, ``source``,
    ``actor``, ``cancelled()``) and the response side: the state (see the
    theory of operation) and the channel to the caller -- ``pipe`` and
    ``slot`` (head through the slot, body through the pipe), ``pipe`` alone
    with ``raw`` (a handler class writes HTTP itself), or neither (the
    caller's thread takes ``head`` and ``first`` when the app's step
    returns).  Adapters call ``respond``, ``write`` (or ``forward``),
    ``finish`` and ``fail``; the caller's side calls ``leave``, the
    server's side ``abort``.  Every body byte on its way to the caller
    passes ``account``, where the call journal and a ``Fault`` see it.
    """

    # What most exchanges never change is a class default, not set per
    # request (no __slots__: a small request costs less this way).
    pipe: Optional[BodyPipe] = None
    slot: Optional[_HeadSlot] = None
    raw = False
    head: Optional[_Head] = None
    first = b""  # the body bytes that came with the head (caller's thread)
    error: Optional[BaseException] = None  # abort()'s, for a caller that pulls
    short: Optional[BaseException] = None  # a Fault's cut: the response raises it at EOF
    timed_out = False  # the caller's wait for the head timed out
    on_leave: Optional[Callable[[], None]] = None  # ASGI: wake receive()
    call: Optional[Call] = None  # the journal's record of this exchange
    fault: Optional[_FaultRun] = None
    parser: Optional[_RawParser] = None  # a handler class's raw output, followed
    on_loop = False  # ASGI: the adapter waits out a Fault's delays itself
    head_at = 0.0  # when the app produced its head (time.monotonic())
    declared: Optional[str] = None  # the head's Content-Length, as sent
    remote = False  # a remote mount's: its redirects are not followed
    bare = False  # read by plain http.client (intercept), not by a _Response
    dropped: Optional[BaseException] = None  # drain's cancel of an answer read only in part
    table: Optional[_Mounts] = None  # whose drain waits for it
    _event: Optional[threading.Event] = None

    def __init__(self, name: str, source: Optional[Source], actor: Any, method: str) -> None:
        self.name = name
        self.source = source
        self.actor = actor
        self.method = method
        self.state = _WAITING

    def _to(self, state: str) -> bool:
        with _LOCK:
            if state not in _NEXT[self.state]:
                return False
            self.state = state
            return True

    def event(self) -> threading.Event:
        # Built on first use: most requests never ask, and an Event costs
        # more than the rest of a small request's bookkeeping.
        event = self._event
        if event is None:
            with _LOCK:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
                    if self.state == _LEFT:
                        event.set()
        return event

    def _end(self, outcome: str) -> None:
        if self.call is not None:
            self.call._end(outcome)

    # -- the app's side --------------------------------------------------------

    def respond(self, code: int, reason: str, headers: List[Tuple[str, str]],
                first: bytes = b"", whole: bool = False, page: bool = False) -> None:
        """Send the head, with ``first``, the body bytes that came with it
        (``whole``: all of the body).  ``BrokenPipeError`` once the caller
        has left.  (``page``: the bridge's own 500 page, sent by ``fail``.)"""
        if not page:
            with _LOCK:  # (_to, written out: this is every request's path)
                started = _STREAMING in _NEXT[self.state]
                if started:
                    self.state = _STREAMING
            if not started:
                raise BrokenPipeError(errno.EPIPE, "the caller has closed the response")
        # What wsgiref and uvicorn add: a Date, and a Content-Length for a
        # body known whole.
        dated = False
        declared = None
        for name, value in headers:
            lower = name.lower()
            if lower == "date":
                dated = True
            elif lower == "content-length" and declared is None:
                declared = value
        if whole and declared is None:
            declared = str(len(first))
            headers.append(("Content-Length", declared))
        self.declared = declared
        if self.method == "HEAD":
            # The body a HEAD answer declares never goes (a server drops
            # it): neither the journal nor a Fault may count it as sent.
            first = b""
        if not dated:
            headers.append(("Date", _http_date()))
        head = (code, reason, headers)
        if self.fault is not None:
            self.head_at = time.monotonic()
        if self.call is not None:
            self.call._head(head)
        pipe = self.pipe
        if pipe is None:
            self.head = head  # the caller's thread takes it, and first
            self.first = first
            return
        if self.raw:
            lines = ["HTTP/1.0 %d %s" % (code, reason)]
            lines.extend("%s: %s" % field for field in headers)
            self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + first)
            return
        if first and self.call is None and self.fault is None:
            pipe.write(first)  # in the pipe before the caller wakes for the head
            first = b""
        if self.slot is not None:
            self.slot.put(head)
        if first:
            self.forward(first)

    def began(self) -> None:
        """A handler class wrote the first bytes of its raw head."""
        self._to(_STREAMING)

    def write(self, data: Any) -> int:
        """Bytes for the caller: the body, or a handler class's raw HTTP."""
        pipe: BodyPipe = self.pipe  # type: ignore[assignment]
        parser = self.parser
        if parser is None:
            return pipe.write(data)
        # A handler class's raw output, with a journal or a Fault to serve:
        # only its body bytes count (its framing, chunked or not, does not).
        data = data if type(data) is bytes else memoryview(data).tobytes()
        if self.state == _WAITING:
            self.head_at = time.monotonic()
        spans = parser.feed(data)
        if parser.head is not None and self.call is not None and self.call.status is None:
            self.call._head(parser.head)
        body = b"".join(data[start:end] for start, end in spans)
        if not body:
            return pipe.write(data)
        keep, action = self.account(body)
        if keep < len(body):
            # Where the kept body bytes end in the raw output.
            for start, end in spans:
                if keep <= end - start:
                    pipe.write(data[:start + keep])
                    break
                keep -= end - start
        else:
            pipe.write(data)
        self._act(action)
        return len(data)

    def forward(self, data: bytes) -> bytes:
        """Body bytes on their way to the caller, from a thread that may
        wait: written to the pipe (returned, for a caller that pulls)."""
        if self.call is None and self.fault is None:
            if self.pipe is not None:
                self.pipe.write(data)
            return data
        keep, action = self.account(data)
        kept = data[:keep] if keep < len(data) else data
        if self.pipe is not None and kept:
            self.pipe.write(kept)
        self._act(action)
        return kept

    def account(self, data: bytes) -> Tuple[int, Optional[str]]:
        """How many of these body bytes go to the caller, and what a Fault
        does after them (the caller then acts); the journal records what
        goes.  ``BrokenPipeError`` once the caller has left."""
        if self.state == _LEFT:
            raise BrokenPipeError(errno.EPIPE, "the caller has closed the response")
        keep, action = len(data), None
        run = self.fault
        if run is not None:
            if not self.on_loop:
                self.pause(run.fault.chunk_delay)
            keep, action = run.step(len(data))
        if self.call is not None and keep:
            self.call._response(data[:keep])
        return keep, action

    def _act(self, action: Optional[str]) -> None:
        if action == "stall":
            self.event().wait()  # nothing more arrives until the caller gives up
            raise BrokenPipeError(errno.EPIPE, "the caller has closed the response")
        if action is not None:
            self.cut(action)

    def hold_head(self, deadline: Optional[float]) -> None:
        """The caller's side of a Fault's delay: the head it has is held
        until ``delay`` after the app produced it -- or, past the caller's
        deadline, ``socket.timeout``, as from a server that did not answer
        in time.  The app meanwhile goes on, as behind a slow network."""
        run = self.fault
        if run is None or not run.fault.delay:
            return
        due = self.head_at + run.fault.delay
        now = time.monotonic()
        if deadline is not None and due > deadline:
            time.sleep(max(deadline - now, 0.0))
            self.timed_out = True
            if self.call is not None:
                self.call._end("timeout", force=True)  # whatever the app did: no head came
            raise socket.timeout("timed out")
        if due > now:
            time.sleep(due - now)

    def pause(self, seconds: float) -> None:
        """A Fault's delay, cut short when the caller leaves."""
        if seconds > 0:
            self.event().wait(seconds)

    def finish(self) -> None:
        """The app ended its response."""
        with _LOCK:  # (_to, written out: this is every request's path)
            done = _DONE in _NEXT[self.state]
            if done:
                self.state = _DONE
        if done and self.call is not None:
            self.call._end("complete")
        if self.pipe is not None:
            self.pipe.close_writer()

    def fail(self, exc: BaseException, cleanup: Optional[Callable[[], None]] = None
             ) -> Optional[BaseException]:
        """The app raised: logged, then wsgiref's 500 page if nothing was
        sent yet, else the end of the body with an error for the reader
        (returned, for a caller that pulls).  ``cleanup`` runs after the log
        and before the caller hears, as a server closes the app first."""
        state = self.state
        error: Optional[BaseException] = None
        if state == _WAITING and self._to(_FAILED):
            _log_app_error(self, "before responding", exc)
            self._end("app-error")
            if cleanup is not None:
                cleanup()
            self.fault = None  # the 500 page is the bridge's, not the app's
            try:
                self.respond(int(_ERROR_STATUS[:3]), _ERROR_STATUS[4:],
                             [("Content-Type", "text/plain")], _ERROR_BODY, True, page=True)
            except BrokenPipeError:
                return None  # the caller is gone; nobody is left to tell
            if self.pipe is not None:
                self.pipe.close_writer()
            return None
        if state == _STREAMING and self._to(_FAILED):
            _log_app_error(self, "after its response started", exc)
            self._end("app-error")
            error = _failure(self.name, "after its response started", exc)
        elif state == _DONE:
            _log_app_error(self, "after its response ended", exc)
        else:
            _log_app_error(self, "after its caller left", exc)
        if cleanup is not None:
            cleanup()
        if error is not None and self.pipe is not None:
            self.pipe.close_writer(error)
        return error

    # -- the caller's and the server's side ------------------------------------

    def relay(self, exc: BaseException) -> None:
        """A remote mount's far end failed mid-body: the caller gets that
        error itself (a timeout stays a timeout)."""
        if self._to(_FAILED):
            if self.call is not None:
                self.call._end("app-error")
            if self.pipe is not None:
                self.pipe.close_writer(exc)

    def cancel(self, error: BaseException) -> bool:
        """Drain's deadline came: the caller's reads raise ``error`` -- also
        when the app has finished and the caller is still reading."""
        if self.abort(error):
            return True
        pipe = self.pipe
        if self.state != _DONE or pipe is None or pipe.reader_closed:
            return False  # the caller has read it to the end: nothing to cancel
        # Not read to the end: what waits in the pipe goes, and what the
        # caller's buffers hold (a handler class's head brings its body
        # along) is not served either -- its response raises.
        pipe.discard(error)
        self.dropped = error
        self.leave()
        return True

    def leave(self) -> None:
        """The caller closed, dropped or timed out on the response."""
        if self._to(_LEFT) and self.call is not None:
            pipe = self.pipe
            self._end("complete" if self.call._whole
                      else "timeout" if self.timed_out or (pipe is not None and pipe.timed_out)
                      else "caller-closed")
        with _LOCK:
            event = self._event
        if event is not None:
            event.set()
        if self.on_leave is not None:
            self.on_leave()
        if self.table is not None:
            self.table.forget(self)

    def abort(self, error: BaseException, outcome: str = "cut", short: bool = False) -> bool:
        """Drop the exchange as a server drops a connection: the caller gets
        ``error`` -- from ``open()`` before the head, from its next read
        after (``short``: at the end of what was sent, as a response cut
        short) -- and the app sees its caller leave.  False once the app had
        finished: what it sent stands."""
        with _LOCK:
            state = self.state
            if state not in (_WAITING, _STREAMING):
                return False
            self.state = _LEFT
        self._end(outcome)
        if short:
            self.short = error
        else:
            self.error = error
        if state == _WAITING and self.slot is not None:
            self.slot.put(error)
        if self.pipe is not None:
            if short:
                self.pipe.abort(None)  # EOF; the response object raises
            else:
                self.pipe.abort(error)
        self.leave()
        return True

    def cut(self, how: str) -> None:
        """A Fault's cut (the body ends early: ``IncompleteRead``) or reset
        (``ConnectionResetError``), after the bytes sent so far."""
        if how == "reset":
            self.abort(ConnectionResetError(errno.ECONNRESET, "in-process connection reset by "
                                            "a Fault(reset_after=...)"))
        else:
            # A _Response turns the early end into IncompleteRead with every
            # byte sent; plain http.client gets the error from the pipe.
            self.abort(http.client.IncompleteRead(b""), short=not self.bare)

    def await_head(self, timeout: Optional[float]) -> _Head:
        """The caller's side of the slot: the head, or what stands for it
        raised.  On any failure the pipe closes -- the caller never gets a
        response to close, and the app must hear that it left."""
        try:
            if self.slot is None:
                raise RuntimeError("this exchange has no head slot")
            if self.error is not None:
                # Dropped (drain's cancel) before this slot was made: abort()
                # had no slot to put its error in.
                raise self.error
            start = time.monotonic()
            head = self.slot.take(timeout)
            if isinstance(head, BaseException):
                raise head
            self.hold_head(None if timeout is None else start + timeout)
        except BaseException as exc:
            self.timed_out = isinstance(exc, socket.timeout)
            if self.pipe is not None:
                self.pipe.close()
            raise
        return head  # type: ignore[no-any-return]


class _RawParser:
    """Follows raw HTTP/1.x -- what a handler class writes, or what
    http.client sends it -- far enough to tell body bytes from the head and
    from chunked framing: what the call journal and a ``Fault`` count.  It
    only watches; the caller's http.client still reads the bytes itself."""

    def __init__(self, method: Optional[str]) -> None:
        self.method = method  # the request's, when following a response; None: a request
        self.head: Optional[_Head] = None
        self.line = ""  # a request's request line, once its head is in
        self.fields: List[Tuple[str, str]] = []  # and its header fields
        self.state = "head"
        self.left = 0  # body bytes (or chunk bytes) still due
        self._line = b""
        self._lines: List[bytes] = []

    def feed(self, data: bytes) -> List[Tuple[int, int]]:
        """The spans of ``data`` that are body bytes."""
        spans: List[Tuple[int, int]] = []
        at, size = 0, len(data)
        while at < size and self.state != "done":
            if self.state in ("data", "chunk", "close"):
                end = size if self.state == "close" else min(size, at + self.left)
                spans.append((at, end))
                self.left -= end - at
                at = end
                if not self.left and self.state != "close":
                    self.state = "done" if self.state == "data" else "crlf"
                continue
            if self.state == "head" and not self._line:
                end = data.find(b"\r\n\r\n", at)
                if end >= 0:  # a whole head, as http.server flushes it: all lines at once
                    self._lines.extend(data[at:end].split(b"\r\n"))
                    at = end + 4
                    self._framing()
                    continue
            newline = data.find(b"\n", at)
            if newline < 0:
                self._line += data[at:]
                break
            line, self._line = self._line + data[at:newline], b""
            at = newline + 1
            self._take(line.rstrip(b"\r"))
        return spans

    def _take(self, line: bytes) -> None:
        state = self.state
        if state == "crlf":
            self.state = "size"
        elif state == "size":
            try:
                self.left = int(line.split(b";")[0].strip() or b"0", 16)
            except ValueError:
                self.left = -1
            if self.left < 0:
                # http.client fails the read on this line: nothing after it is
                # body (and the watcher must not fail the app's write).
                self.state = "done"
                return
            self.state = "chunk" if self.left else "trailer"
        elif state == "trailer":
            self.state = "trailer" if line else "done"
        elif line:
            self._lines.append(line)
        else:
            self._framing()

    def _framing(self) -> None:
        lines, self._lines = self._lines, []
        fields: List[Tuple[str, str]] = []
        first: Dict[str, str] = {}  # the first of each framing header
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if colon:
                field = (name.strip().decode("latin-1"), value.strip().decode("latin-1"))
                fields.append(field)
                lower = field[0].lower()
                if lower in ("content-length", "transfer-encoding") and lower not in first:
                    first[lower] = field[1]
        self.line = lines[0].decode("latin-1") if lines else ""
        self.fields = fields
        code = 0
        if self.method is not None:
            status = lines[0].split(None, 2) if lines else []
            code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
            if code == 100:
                return  # 100 Continue: the real head follows (any other 1xx is
                # the answer to http.client, which skips only this one)
            self.head = (code, status[2].decode("latin-1") if len(status) > 2 else "", fields)
        length = first.get("content-length", "")
        if first.get("transfer-encoding", "").lower() == "chunked":
            self.state = "size"
        elif self.method == "HEAD" or code in (204, 304) or 100 < code < 200:
            self.state = "done"
        elif length.isdecimal():  # (isdigit() takes "\u00b2" too, which int() refuses)
            self.left = int(length)
            self.state = "data" if self.left else "done"
        else:
            self.state = "close" if self.method is not None else "done"


# ---------------------------------------------------------------------------
# The request, checked and built once
# ---------------------------------------------------------------------------


class _Request:
    """What urllib would send, checked as http.client checks it before a
    byte leaves -- so a bad request fails the same way on every path and
    before any app runs -- and split the way every app kind wants it."""

    __slots__ = ("req", "method", "target", "headers", "scheme", "host", "port", "body", "timeout")

    def __init__(self, req: urllib.request.Request) -> None:
        self.req = req
        self.method = req.get_method()
        self.target = req.selector or "/"
        _check_request_line(self.method, self.target)
        self.headers = _wire_headers(req)
        self.scheme = "https" if req.type == "https" else "http"
        host, port = _split_host(req.host)
        self.host = host
        self.port = port or _DEFAULT_PORTS[self.scheme]
        #: None, bytes (all of it) or a _RequestBody (a file or an iterable)
        self.body = _request_body(req.data)
        self.timeout = _effective_timeout(getattr(req, "timeout", None))


def _wire_headers(req: urllib.request.Request) -> List[Tuple[str, str]]:
    """The header block urllib and http.client would put on the wire, in
    order, checked as http.client checks it."""
    headers = dict(req.unredirected_hdrs)
    headers.update({k: v for k, v in req.headers.items() if k not in headers})
    if type(req) is not _RawRequest:
        headers["Connection"] = "close"  # what urllib's do_open sends
    lines: List[Tuple[str, str]] = []
    host = encoding = True
    for name in headers:
        lower = name.lower()
        if lower == "host":
            host = False
        elif lower == "accept-encoding":
            encoding = False
    if host:
        lines.append(("Host", req.host))
    if encoding:
        lines.append(("Accept-Encoding", "identity"))
    for name, value in headers.items():
        line = _checked_headers.get((name, value)) if type(value) is str else None
        if line is None:
            line = _check_header(name, value)
            if type(value) is str and len(_checked_headers) < 256:
                _checked_headers[(name, value)] = line
        lines.append(line)
    return lines


# urllib sends the same User-Agent, Connection and Host on every request:
# remembering headers already checked saves ~2 us of a 25 us request.
_checked_headers: Dict[Tuple[str, str], Tuple[str, str]] = {}


def _check_header(name: str, value: Any) -> Tuple[str, str]:
    name = name.title()
    if isinstance(value, int):
        value = str(value)
    elif isinstance(value, bytes):
        value = value.decode("latin-1")
    else:
        value.encode("latin-1")  # http.client's own check: UnicodeEncodeError
    if not _TOKEN.fullmatch(name):
        raise ValueError("Invalid header name %r" % (name,))
    if _BAD_VALUE.search(value):
        raise ValueError("Invalid header value %r" % (value,))
    return name, value


def _check_request_line(method: str, selector: str) -> None:
    """Refuse what http.client refuses in a request line, the same way."""
    if _BAD_METHOD_CHAR.search(method):
        raise ValueError("method can't contain control characters. %r" % (method,))
    if _BAD_URL_CHAR.search(selector):
        raise http.client.InvalidURL(
            "URL can't contain control characters. %r" % (selector,)
        )
    if not (method.isascii() and selector.isascii()):
        ("%s %s" % (method, selector)).encode("ascii")  # http.client's UnicodeEncodeError


class _RequestBody(_ChunkReader):
    """A file or iterable request body, pulled as the app reads (a slow app
    holds the caller's producer back).  A failure of the caller's own body
    is kept in ``error`` for the caller; the app sees a broken read."""

    def __init__(self, data: Any) -> None:
        super().__init__()
        self.error: Optional[BaseException] = None
        if hasattr(data, "read"):
            self._text = isinstance(data, io.TextIOBase)
            self._chunks: Optional[Iterator[Any]] = iter(
                functools.partial(data.read, 8192), "" if self._text else b"")
        else:
            self._chunks = iter(data)
            self._text = False
        self._cut = False  # detach() left part of the body with the caller
        self.call: Optional[Call] = None  # the journal's, which keeps what was taken

    def _next(self) -> Optional[bytes]:
        """The caller's next item (maybe empty), or None at its end."""
        chunks = self._chunks
        if chunks is None:
            return None
        try:
            item = next(chunks)
            if self._text and isinstance(item, str):
                item = item.encode("iso-8859-1")
            elif isinstance(item, str) or not isinstance(item, (bytes, bytearray, memoryview)):
                raise TypeError(
                    "request body items must be bytes-like, not %s" % type(item).__name__
                )
        except StopIteration:
            self._chunks = None
            return None
        except BaseException as exc:  # noqa: BLE001 - the caller's error, kept for the caller
            self._chunks = None
            self.error = exc
            raise ConnectionAbortedError(
                errno.ECONNABORTED, "the caller's request body failed: %r" % (exc,)
            ) from None
        item = item if type(item) is bytes else bytes(item)
        if self.call is not None:
            self.call._took(item)
        return item

    def _next_chunk(self, want: int) -> Optional[bytes]:
        while True:
            item = self._next()
            if item is None:
                if self._cut:
                    raise ConnectionAbortedError(
                        errno.ECONNABORTED, "the request body was cut off: the app read more "
                        "than %d bytes of it after it began its response" % PIPE_LIMIT)
                return None
            if item:
                return item

    def detach(self, limit: int) -> None:
        """``open()`` is returning: take up to ``limit`` more bytes of the
        caller's body into memory for the app, and never touch the caller's
        object again.  What lies past that stays with the caller; an app that
        reads on into it gets ``ConnectionAbortedError``, as a server's read
        fails once its client went away mid-body -- never a clean EOF."""
        parts: List[bytes] = []
        size = 0
        try:
            while size < limit:
                item = self._next()
                if item is None:
                    break
                parts.append(item)
                size += len(item)
            else:
                self._cut = self._chunks is not None
        except ConnectionAbortedError:
            pass  # kept in self.error for the caller
        self._chunks = iter(parts)

    def feed(self, inbox: BodyPipe) -> None:
        """Send this body into ``inbox`` (read by an app on another thread)
        from the caller's thread, as http.client sends one: before the
        response is read, held back while the app does not read.  So nothing
        but the caller's thread ever touches the caller's body object."""
        try:
            while True:
                data = self._next_chunk(_RECEIVE_LIMIT)
                if data is None:
                    break
                view = memoryview(data)
                for start in range(0, len(data), _RECEIVE_LIMIT):  # an ASGI message's share
                    inbox.write(view[start:start + _RECEIVE_LIMIT] if len(data) > _RECEIVE_LIMIT
                                else data)
        except BrokenPipeError:
            return  # the app finished without reading it all: dropped, as TCP would
        except BaseException as exc:
            inbox.close_writer(ConnectionAbortedError(
                errno.ECONNABORTED, "the caller stopped sending its request body: %s: %s"
                % (type(exc).__name__, exc)))
            if self.error is not None:
                raise self.error from None
            if isinstance(exc, socket.timeout):
                raise urllib.error.URLError(exc) from exc  # as urllib's do_open reports it
            raise
        inbox.close_writer()


def _request_body(data: Any) -> Any:
    """urllib's ``data`` as a request body: ``None``, ``bytes`` (all of it),
    or a ``_RequestBody`` for a file or an iterable (sent chunked)."""
    if data is None or type(data) is bytes:
        return data
    if isinstance(data, str):
        raise TypeError(
            "POST data should be bytes, an iterable of bytes, or a file object. "
            "It cannot be of type str."
        )
    if not hasattr(data, "read") and isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    try:
        return _RequestBody(data)
    except TypeError:
        raise TypeError(
            "data should be a bytes-like object or an iterable, got %r" % type(data)
        ) from None


# ---------------------------------------------------------------------------
# App adapters: a BaseHTTPRequestHandler class
# ---------------------------------------------------------------------------
#
# The handler class runs its own setup/handle/finish on a worker, reading the
# request from an in-memory socket and writing raw HTTP into the exchange's
# pipe; on the caller's side urllib's own do_open drives an HTTPConnection
# whose socket is the other end, so the request leaves as urllib sends it and
# http.client parses the response as it would off the wire.


class _StubServer:
    """What a handler class sees as ``self.server`` when none was mounted."""

    def __init__(self, host: str, port: int) -> None:
        self.server_name = host
        self.server_port = port
        self.server_address = (host, port)


class _WireOut(io.RawIOBase):
    """The raw file under a buffered ``wfile``: writes go to the response
    pipe; closing it (``finish()`` does) leaves the pipe to the bridge."""

    def __init__(self, conn: _HandlerSocket) -> None:
        super().__init__()
        self._conn = conn

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self._conn.send(b)


class _HandlerSocket:
    """The in-memory socket a handler class gets as ``request`` and
    ``connection``: it reads the request and writes the response pipe."""

    def __init__(self, run: _HandlerRun) -> None:
        self._run = run

    def makefile(self, mode: str = "r", buffering: Optional[int] = None, **_: Any) -> Any:
        size = io.DEFAULT_BUFFER_SIZE if buffering is None or buffering < 0 else buffering
        if "w" in mode:
            raw = _WireOut(self)
            return raw if buffering == 0 else io.BufferedWriter(raw, size)
        pipe = self._run.inbound
        if pipe is None:
            return self._run.request  # all of it is here: no buffer needed
        return pipe if buffering == 0 else io.BufferedReader(pipe, size)

    def sendall(self, data: Any) -> None:
        self.send(data)

    def send(self, data: Any) -> int:
        exchange = self._run.exchange
        n = exchange.write(data)
        if n and exchange.state == _WAITING:
            exchange.began()
        return n

    def recv(self, size: int) -> bytes:
        source = self._run.inbound or self._run.request
        return source.read(size) or b""

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        view = memoryview(buffer)
        source = self._run.inbound or self._run.request
        return source.readinto(view[:nbytes] if nbytes else view) or 0

    def settimeout(self, timeout: Optional[float]) -> None:
        if self._run.inbound is not None:
            self._run.inbound.read_timeout = timeout

    def gettimeout(self) -> Optional[float]:
        return None if self._run.inbound is None else self._run.inbound.read_timeout

    def setsockopt(self, *args: Any) -> None:
        pass

    def getsockopt(self, *args: Any) -> int:
        return 0

    def getpeername(self) -> Tuple[str, int]:
        return CLIENT_ADDRESS

    def getsockname(self) -> Tuple[str, int]:
        return ("127.0.0.1", 0)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an in-process connection has no file descriptor")

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


class _HandlerRun:
    """One request to a handler class: the request bytes http.client sends
    (held whole up to ``_HOLD_LIMIT``, else streamed to ``rfile`` through a
    pipe) and the worker job that runs the handler's life cycle."""

    def __init__(self, entry: _Entry, exchange: _Exchange, ctx: contextvars.Context,
                 timeout: Optional[float]) -> None:
        self.entry = entry
        self.exchange = exchange
        self.ctx = ctx
        self.timeout = timeout
        self.held: List[bytes] = []
        self.held_size = 0
        self.request = _Body()  # rfile when the request was held whole
        self.inbound: Optional[BodyPipe] = None  # rfile's pipe for a streamed request
        exchange.raw = True
        exchange.pipe = BodyPipe(read_timeout=timeout, on_close=exchange.leave)
        if exchange.error is not None:
            # Dropped (drain's cancel) before this pipe was made: abort() had
            # no pipe to cut, so the caller's first read gets its error here.
            exchange.pipe.abort(exchange.error)
        if exchange.call is not None or exchange.fault is not None:
            exchange.parser = _RawParser(exchange.method)
        self.capture: Optional[Call] = None  # the journal's call, for a streamed body
        self.stream = False  # the body is a file or an iterable: never held back
        self.launched = False

    # -- the caller's side ---------------------------------------------------

    def send(self, data: Any) -> None:
        pipe = self.inbound
        if self.capture is not None:
            self.capture._took_raw(data if type(data) is bytes else memoryview(data).tobytes())
        if pipe is None:
            data = data if type(data) is bytes else memoryview(data).tobytes()
            if self.held_size + len(data) <= _HOLD_LIMIT and not self.stream:
                self.held.append(data)
                self.held_size += len(data)
                return
            # Too big to hold, or a body that streams (its producer may wait
            # for the app, as over TCP): the app starts reading while the
            # rest arrives.
            pipe = self.inbound = BodyPipe(write_timeout=self.timeout)
            held, self.held = self.held, []
            for part in held:
                self._feed(part)
            self.launch()
        self._feed(data)

    def _feed(self, data: Any) -> None:
        try:
            cast(BodyPipe, self.inbound).write(data)
        except BrokenPipeError:
            pass  # the app finished without reading it all: dropped, as TCP would

    def end_request(self) -> None:
        """http.client has sent everything and now waits for the response."""
        if self.inbound is None:
            self.request = _Body(b"".join(self.held))
            self.held = []
        else:
            # The app's rfile sees EOF after the body instead of waiting for
            # bytes that can never come.
            self.inbound.close_writer()
        self.launch()

    def response_file(self) -> io.RawIOBase:
        """The caller's end of the response -- for urllib's connection and
        for an intercepted http.client one alike, so a Fault's delay holds
        the head on both."""
        raw: io.RawIOBase = self.exchange.pipe  # type: ignore[assignment]
        if self.exchange.fault is not None and self.exchange.fault.fault.delay:
            raw = _HeldHead(raw, self.exchange, self.timeout)
        return raw

    def abort(self) -> None:
        """The request failed before a response object took the pipe."""
        if self.inbound is not None:
            # Sent in full (end_request() closed it) or cut short: then the
            # app's rfile fails after the bytes that came, as a socket read
            # does once the client went away -- never a clean EOF.
            self.inbound.close_writer(ConnectionAbortedError(
                errno.ECONNABORTED, "the caller went away before its request was sent"))
        cast(BodyPipe, self.exchange.pipe).close()

    # -- the worker's side ---------------------------------------------------

    def launch(self) -> None:
        if not self.launched:
            self.launched = True
            _workers.submit(lambda: self.ctx.run(self._serve))

    def _serve(self) -> None:
        entry, exchange = self.entry, self.exchange
        try:
            entry.app(_HandlerSocket(self), CLIENT_ADDRESS, entry.server)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: the process must survive
            exchange.fail(exc, self._drop_request)
            return
        self._drop_request()
        if exchange.state == _WAITING:
            # Returned without a word: the seed's well-formed empty answer.
            with contextlib.suppress(BrokenPipeError):
                exchange.respond(200, "OK", [("Content-Length", "0")])
        exchange.finish()

    def _drop_request(self) -> None:
        # Request bytes nobody will read are dropped, as a socket's buffer
        # would swallow them, so a caller still sending is freed.
        if self.inbound is not None:
            self.inbound.close()


class _ClientSocket:
    """The caller's end of a handler-class request, shaped as the socket
    ``http.client`` writes the request to and reads the response from."""

    def __init__(self, run: _HandlerRun) -> None:
        self._run = run
        self._file: Optional[io.BufferedReader] = None

    def sendall(self, data: Any) -> None:
        self._run.send(data)

    def send(self, data: Any) -> int:
        self._run.send(data)
        return len(data)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        # http.client asks for the response file once the request is sent.
        run = self._run
        run.end_request()
        self._file = io.BufferedReader(run.response_file())
        return self._file

    def settimeout(self, timeout: Optional[float]) -> None:
        run = self._run
        run.timeout = timeout
        cast(BodyPipe, run.exchange.pipe).read_timeout = timeout
        if run.inbound is not None:
            run.inbound.write_timeout = timeout

    def setsockopt(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        if self._file is None:
            # No response object owns the pipe: the app must learn that its
            # caller is gone.
            self._run.abort()


class _HeldHead(_ChunkReader):
    """The caller's end of a handler class's pipe under a Fault's delay: the
    first bytes (the head) are held, see ``_Exchange.hold_head``."""

    def __init__(self, pipe: io.RawIOBase, exchange: _Exchange, timeout: Optional[float]) -> None:
        super().__init__()
        self._pipe = pipe
        self._exchange: Optional[_Exchange] = exchange
        self._timeout = timeout

    def _next_chunk(self, want: int) -> Optional[bytes]:
        start = time.monotonic()
        data = self._pipe.read(want)
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.hold_head(None if self._timeout is None else start + self._timeout)
        return data or None

    def close(self) -> None:
        self._pipe.close()
        super().close()


class _Connection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose socket is a pair of pipes to a handler
    class running on a worker; urllib's ``do_open`` drives it, so the request
    leaves as urllib would send it and http.client parses the response."""

    response_class: Any = None  # _Response, set below it

    def __init__(self, host: str, timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                 *, run: _HandlerRun) -> None:
        super().__init__(host, timeout=timeout)
        self._run = run

    def getresponse(self) -> http.client.HTTPResponse:
        resp = super().getresponse()
        resp._exchange = self._run.exchange  # type: ignore[attr-defined]
        return resp

    def connect(self) -> None:
        sock = _ClientSocket(self._run)
        sock.settimeout(_effective_timeout(self.timeout))
        self.sock = sock

    def putheader(self, header: Union[str, bytes], *values: Any) -> None:
        # The bridge has checked these headers already (_wire_headers, which
        # also refuses the control characters http.client lets through):
        # format them as http.client would without its second pass (~3 us).
        if type(header) is str and len(values) == 1 and type(values[0]) is str:
            self._buffer.append(("%s: %s" % (header, values[0])).encode("latin-1"))  # type: ignore[attr-defined]
        else:
            super().putheader(header, *values)


def _serve_raw(request: _Request, entry: _Entry, exchange: _Exchange, ctx: contextvars.Context,
               raw: bytes) -> _HandlerRun:
    # A request intercept() takes off an http.client connection, byte for
    # byte, from its head on: the handler class reads what the client sends
    # as it sends it, the client parses what the handler writes, as over TCP.
    exchange.bare = True
    run = _HandlerRun(entry, exchange, ctx, request.timeout)
    run.stream = True
    run.capture = exchange.call  # the journal follows the bytes
    run.send(raw)
    return run


def _serve_handler(bridge: InProcHandler, table: _Mounts, request: _Request, entry: _Entry,
                   exchange: _Exchange, ctx: contextvars.Context) -> _Response:
    run = _HandlerRun(entry, exchange, ctx, request.timeout)
    if isinstance(request.body, _RequestBody):
        run.capture = exchange.call  # http.client sends it: the journal follows the bytes
        run.stream = True
    return urllib.request.AbstractHTTPHandler.do_open(  # type: ignore[return-value]
        bridge, _Connection, request.req, run=run)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# App adapters: WSGI
# ---------------------------------------------------------------------------


class _ErrorLog(io.TextIOBase):
    """``wsgi.errors``: text written here goes to the ``inproc_bridge`` logger."""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        text = s.rstrip("\n")
        if text:
            _log.warning("wsgi.errors: %s", text)
        return len(s)


_WSGI_ERRORS = _ErrorLog()
_ENVIRON_KEYS: Dict[str, str] = {}


def _environ_key(name: str) -> str:
    """``Content-Type`` -> ``CONTENT_TYPE``, ``X-Id`` -> ``HTTP_X_ID``; ``""``
    for a name with an underscore, dropped (as nginx and gunicorn drop it) so
    that ``X_Id`` cannot pass for a proxy's ``X-Id``."""
    if "_" in name:
        key = ""
    else:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
    if len(_ENVIRON_KEYS) < 256:
        _ENVIRON_KEYS[name] = key
    return key


def _environ(request: _Request, exchange: _Exchange) -> Dict[str, Any]:
    """A PEP 3333 environ built as a real server would from the request
    (``wsgi.input`` is the adapter's to set)."""
    path, _, query = request.target.partition("?")
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": urllib.parse.unquote(path, "iso-8859-1"),
        "QUERY_STRING": query,
        "SERVER_NAME": request.host,
        "SERVER_PORT": str(request.port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": CLIENT_ADDRESS[0],
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": request.scheme,
        "wsgi.errors": _WSGI_ERRORS,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
        "inproc.source": exchange.source,
        "inproc.actor": exchange.actor,
    }
    for name, value in request.headers:
        key = _ENVIRON_KEYS.get(name)
        if key is None:
            key = _environ_key(name)
        if not key:
            continue
        value = value.strip()
        if key in environ:
            environ[key] += "," + value
        else:
            environ[key] = value
    return environ


def _check_chunk(data: Any) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError("WSGI apps must produce bytes, not %s (PEP 3333)" % type(data).__name__)


class _WSGICall:
    """One call of a WSGI app: ``start_response``, ``write``, the iterable
    and its ``close()``, checked as PEP 3333 asks, over the exchange.  The
    same object serves the caller-thread path (the caller pulls chunks) and
    the worker path (``pump`` pushes them into the exchange's pipe)."""

    def __init__(self, app: Callable[..., Any], request: _Request, exchange: _Exchange) -> None:
        self.app = app
        self.exchange = exchange
        self.environ = _environ(request, exchange)
        body = request.body
        self.request_body = body if isinstance(body, _RequestBody) else None
        self.inbox: Optional[BodyPipe] = None  # the worker path's streamed request body
        if self.request_body is None:
            self.environ["wsgi.input"] = io.BytesIO(body or b"")
        else:
            self.environ["wsgi.input"] = io.BufferedReader(self.request_body)
        self.status: Optional[str] = None
        self.headers: List[Tuple[str, str]] = []
        self.result: Any = None
        self.iterator: Optional[Iterator[Any]] = None
        self.pending: List[bytes] = []
        self.closed = False
        self.single = False  # the iterable is a one-item sequence: the head holds it all
        self.wrote = False  # the app used write()

    @property
    def body_error(self) -> Optional[BaseException]:
        """What the caller's own streamed request body raised, if it did."""
        return None if self.request_body is None else self.request_body.error

    def start_response(self, status: str, headers: List[Tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                # In the caller's thread data given to write() waits for the
                # app call to return, but for the app it went out, head and
                # all: the head is no longer its to replace.
                if self.exchange.state != _WAITING or any(self.pending):
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise RuntimeError("start_response() called a second time without exc_info (PEP 3333)")
        if type(status) is not str or not _STATUS.fullmatch(status):
            raise ValueError("bad WSGI status %r: want a str like '200 OK'" % (status,))
        if type(headers) is not list:
            raise TypeError("WSGI response headers must be a list, not %s" % type(headers).__name__)
        checked = []
        for item in headers:
            if type(item) is not tuple or len(item) != 2:
                raise TypeError("WSGI response header %r is not a (name, value) tuple" % (item,))
            name, value = item
            if type(name) is not str or type(value) is not str:
                raise TypeError("WSGI response header %r: name and value must be str" % (item,))
            checked.append(_header_field(name, value, "WSGI", item))
        self.status = status
        self.headers = checked
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy ``write()`` callable of PEP 3333."""
        data = _check_chunk(data)
        if self.status is None:
            raise RuntimeError("write() called before start_response()")
        exchange = self.exchange
        if exchange.state == _LEFT:
            raise BrokenPipeError(errno.EPIPE, "the caller has closed the response")
        self.wrote = True
        if exchange.pipe is None:
            # In the caller's thread nothing can reach the caller before the
            # app hands control back, so written data waits, in order, for
            # the next pull.
            self.pending.append(data)
        elif exchange.state != _WAITING:
            if exchange.method != "HEAD":  # (a HEAD answer's body never goes)
                exchange.forward(data)
        elif data:
            status = self.status
            exchange.respond(int(status[:3]), status[4:], self.headers, data)

    def begin(self) -> None:
        """Run the app up to its first non-empty chunk and send the head; a
        failure before that becomes wsgiref's 500 page."""
        exchange = self.exchange
        try:
            self.result = self.app(self.environ, self.start_response)
            self.iterator = iter(self.result)
            if exchange.state != _WAITING:
                return  # a write() on the worker path sent it
            first = self.next_chunk() or b""
            if exchange.state != _WAITING:
                # A write() inside the iterable sent the head: this chunk
                # comes after what it wrote.
                if first:
                    self.pending.append(first)
                return
            status = self.status
            if status is None:
                raise RuntimeError("the WSGI app returned without calling start_response()")
            try:
                self.single = not self.wrote and len(self.result) == 1
            except (TypeError, AttributeError, NotImplementedError):
                pass  # no usable length, as wsgiref takes it: sent as it comes
            exchange.respond(int(status[:3]), status[4:], self.headers, first,
                             self.single or not first)
        except BaseException as exc:
            # Whatever failed -- the app, iter(), the first next(), len() --
            # nothing has reached the caller yet: wsgiref's logged 500.
            if exchange.state != _WAITING:
                raise
            self.pending = []
            self.single = True
            exchange.fail(exc, self.close)

    def next_chunk(self) -> Optional[bytes]:
        """The next non-empty chunk, or ``None`` at the end.  Data given to
        ``write()`` while the iterable ran comes out before what the same
        step yielded, as a server would have sent it."""
        while True:
            if self.pending:
                data = b"".join(self.pending)
                self.pending = []
                if data:
                    return data
            if self.exchange.state == _LEFT:
                # The caller left while the app yields only empty chunks: stop
                # it here, as the next write would, instead of spinning.
                raise BrokenPipeError(errno.EPIPE, "the caller has closed the response")
            iterator = self.iterator
            if iterator is None:
                return None
            try:
                item = _check_chunk(next(iterator))
            except StopIteration:
                self.iterator = None
                continue  # a write() in the last step may still be pending
            if self.pending:
                self.pending.append(item)
            elif item:
                if self.status is None:
                    raise RuntimeError("the WSGI app yielded data before calling start_response()")
                return item

    def close(self) -> None:
        """Call the iterable's ``close()`` once, whatever happened."""
        if self.closed:
            return
        self.closed = True
        self.iterator = None
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 - the caller's answer stands
            _log_app_error(self.exchange, "in its iterable's close()", exc)

    def pump(self) -> None:
        """The worker path: run the app and push its response to the caller."""
        exchange = self.exchange
        try:
            self.begin()
            if exchange.method != "HEAD":
                while True:
                    data = self.next_chunk()
                    if data is None:
                        break
                    exchange.forward(data)
        except BaseException as exc:  # noqa: BLE001
            exchange.fail(exc)
        else:
            exchange.finish()
        finally:
            self.close()
            if self.inbox is not None:
                # Request bytes nobody will read are dropped, as a socket's
                # buffer would swallow them, so a caller still sending is freed.
                self.inbox.close()


class _PulledBody(_ChunkReader):
    """The caller-thread path's body: each read pulls the app's iterable in
    the caller's thread (in the request's context), as Werkzeug's test client
    and httpx's WSGI transport do -- no thread, no hop."""

    def __init__(self, call: _WSGICall, ctx: contextvars.Context, first: bytes) -> None:
        super().__init__()
        self._call = call
        self._ctx = ctx
        self._first = first  # goes to the caller at the first read (a Fault may hold it)
        self._done = False
        self._generation = _fork_generation

    def _next_chunk(self, want: int) -> Optional[bytes]:
        if self._done:
            return None
        if self._generation != _fork_generation:
            # Begun before fork(): the app is the parent's to go on with; a
            # child that pulled it would run its side effects a second time.
            raise _forked_away()
        call = self._call
        exchange = call.exchange
        try:
            while True:
                if exchange.error is not None:
                    raise exchange.error  # the server dropped it
                if exchange.short is not None:
                    data = None  # a Fault cut it: the response raises at this end
                    break
                data, self._first = self._first or self._ctx.run(call.next_chunk), b""
                if data is None:
                    break
                data = exchange.forward(data)  # a Fault may keep part of it, or all
                if data:
                    return data
        except BaseException as exc:  # noqa: BLE001 - the app's failure goes to the reader
            self._done = True
            body_error = call.body_error
            if body_error is not None or exc is exchange.error:
                self._ctx.run(call.close)
                raise (body_error or exc) from None
            error = exchange.fail(exc, lambda: self._ctx.run(call.close))
            raise (error or exc) from None
        self._done = True
        exchange.finish()
        self._ctx.run(call.close)
        return None

    def close(self) -> None:
        if not self.closed and self._generation == _fork_generation:
            call = self._call
            call.exchange.leave()
            if not call.closed:
                self._ctx.run(call.close)
        super().close()


def _serve_wsgi(bridge: InProcHandler, table: _Mounts, request: _Request, entry: _Entry,
                exchange: _Exchange, ctx: contextvars.Context) -> _Response:
    call = _WSGICall(entry.app, request, exchange)
    method, timeout = request.method, request.timeout
    if timeout is None:
        # No deadline to keep: run the app in the caller's thread and pull
        # its iterable as the caller reads -- no thread hop at all.
        ctx.run(call.begin)
        if exchange.error is not None:
            ctx.run(call.close)
            raise exchange.error
        if exchange.fault is not None:
            exchange.hold_head(None)
        body = call.request_body
        if body is not None:
            # What the app has not read yet of the caller's body: as over a
            # socket, a bounded part of it waits for the app; the caller's
            # object is not touched once open() returns.
            body.detach(0 if call.single or method == "HEAD" else PIPE_LIMIT)
        if call.body_error is not None:
            ctx.run(call.close)
            raise call.body_error
        first = exchange.first if method != "HEAD" else b""
        if (call.single or method == "HEAD") and exchange.fault is None:
            # The whole body came with the head: close the iterable now, as
            # wsgiref does once it has written it, and skip the puller.
            if exchange.call is not None:
                exchange.forward(first)  # for the journal
            exchange.finish()
            ctx.run(call.close)
            table.forget(exchange)  # all in memory: nothing left in flight
            file: io.BufferedIOBase = _Body(first)
        else:
            file = io.BufferedReader(_PulledBody(call, ctx, first))
        head = exchange.head
    else:
        exchange.pipe = BodyPipe(read_timeout=timeout, on_close=exchange.leave)
        exchange.slot = _HeadSlot()
        body = call.request_body
        if body is not None:
            # The worker reads the body from a pipe the caller's thread
            # fills: no bridge thread ever reads the caller's object.
            call.inbox = BodyPipe(write_timeout=timeout)
            call.environ["wsgi.input"] = io.BufferedReader(call.inbox)
        _workers.submit(lambda: ctx.run(call.pump))
        if call.inbox is not None and body is not None:
            try:
                body.feed(call.inbox)
            except BaseException:
                exchange.pipe.close()
                raise
        head = exchange.await_head(timeout)
        if call.body_error is not None:
            exchange.pipe.close()
            raise call.body_error
        file = io.BufferedReader(exchange.pipe)
    return _build_response(head, file, request.req, exchange)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# App adapters: ASGI
# ---------------------------------------------------------------------------
#
# An ASGI 3 app runs on an event loop its mount table owns: one daemon thread
# per InProcHandler (an OpenerFactory's openers share the factory's), started
# on first use and stopped by close(), when the table is garbage-collected,
# or at interpreter exit.  The caller's thread hands the request over
# (call_soon_threadsafe, in a copy of its context), feeds a streamed request
# body, and waits for the head in the exchange's slot.  The loop never blocks
# on a pipe (_LoopPipe).  asyncio is imported on first use (and inspect on the
# first mount of a callable), so that importing this module stays cheap.

class ASGIApp:
    """Marks ``app`` as an ASGI 3 application where detection would take it
    for a WSGI one -- a plain function that returns a coroutine, or a wrapper
    whose ``__call__`` is not ``async def``::

        handler.mount("api", inproc_bridge.ASGIApp(wrapped_app))

    It works wherever an app is accepted (``mount`` and the ``apps``
    mappings).  ``lifespan=False`` skips the lifespan protocol for this app.
    An ``ASGIApp`` is itself an ASGI 3 app that awaits the one it wraps."""

    __slots__ = ("app", "lifespan")

    def __init__(self, app: Callable[..., Any], *, lifespan: bool = True) -> None:
        if not callable(app):
            raise TypeError("ASGIApp wants an ASGI 3 callable, not %r" % (app,))
        self.app = app
        self.lifespan = lifespan

    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any],
                       send: Callable[..., Any]) -> None:
        await self.app(scope, receive, send)

    def __repr__(self) -> str:
        return "ASGIApp(%r%s)" % (self.app, "" if self.lifespan else ", lifespan=False")


def _is_asgi(app: Any) -> bool:
    """How ``mount`` recognises an ASGI 3 app: an ``ASGIApp``; a coroutine
    function; an object whose ``__call__`` is one (Starlette, FastAPI,
    Django's ASGIHandler, most middleware) -- seen through
    ``functools.partial``.  A class never is (ASGI 2's double callable is not
    supported); anything else callable is taken for WSGI."""
    if isinstance(app, ASGIApp):
        return True
    while isinstance(app, functools.partial):
        app = app.func
    if isinstance(app, type):
        return False
    import inspect

    # asgiref's markcoroutinefunction before Python 3.12 sets this marker.
    marker = getattr(sys.modules.get("asyncio.coroutines"), "_is_coroutine", None)
    funcs = [app, app.__call__] if callable(app) else []
    return any(
        inspect.iscoroutinefunction(func)
        or (marker is not None and getattr(func, "_is_coroutine", None) is marker)
        for func in funcs
    )


def _settle(future: Any, value: Any = None) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _threadsafe(loop: Any, func: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:
        pass  # the loop is closed: nobody is left waiting



class _LoopPipe(BodyPipe):
    """A ``BodyPipe`` with an event loop at one end.  The loop never blocks
    on it: ``try_put`` and ``try_get`` give up at once, having armed
    ``wake``, which the thread at the other end calls after its next read,
    write or close; the loop sleeps on a future that ``wake`` resolves."""

    def try_put(self, data: bytes, wake: Optional[Callable[[], None]]) -> bool:
        """Queue ``data`` unless the pipe is full; ``BrokenPipeError`` once
        the reader has closed."""
        chunks = self._queue
        if chunks.try_put(data):
            return True
        chunks.wake = wake  # then try again: a read may have come in between
        return chunks.try_put(data)

    def try_get(self, wake: Optional[Callable[[], None]]) -> Optional[bytes]:
        """Queued bytes; ``b""`` at the end; ``None`` while nothing is queued."""
        chunks = self._queue
        if not chunks.ready():
            chunks.wake = wake  # then look again: a write may have come in between
            if not chunks.ready():
                return None
        return chunks.get(None)

    @property
    def drained(self) -> bool:
        """The writer ended cleanly and every byte has been taken."""
        return self._queue.drained

    @property
    def failed(self) -> bool:
        """The writer ended with an error."""
        return self._queue.error is not None


class _ASGICall:
    """One request to an ASGI app: its scope, ``receive`` and ``send``, run
    as a task on the bridge's loop over the exchange.  A streamed request
    body comes in through ``inbox``, fed by the caller's thread."""

    def __init__(self, site: _Site, exchange: _Exchange, request: _Request, keep: Any) -> None:
        self.site = site
        self.exchange = exchange
        self.scope = _asgi_scope(request, exchange, site)
        # The bridge's mounts: while a request lives, their finalizer (which
        # closes the loop) must not run, even if the opener was a temporary.
        self.keep = keep
        self.loop: Any = None
        timeout = request.timeout
        exchange.pipe = _LoopPipe(read_timeout=timeout, on_close=exchange.leave)
        exchange.slot = _HeadSlot()
        exchange.on_leave = self._left
        exchange.on_loop = True  # a Fault's delays are awaited here, not slept
        body = request.body
        # A body given whole, until received; or a file or iterable body.
        self.body: Optional[bytes] = None if isinstance(body, _RequestBody) else body or b""
        self.inbox = _LoopPipe(write_timeout=timeout) if self.body is None else None
        self.no_body = exchange.method == "HEAD"
        self.started = self.finished = False  # the order of the app's messages
        self.length: Optional[int] = None
        self.sent = 0
        # The futures receive() calls sleep on: every one wakes when the
        # caller leaves (several tasks of one app may wait, as uvicorn allows).
        self._waiters: List[Any] = []

    def _left(self) -> None:
        # Any thread: the caller left (or the server dropped the exchange).
        if self.loop is not None:
            _threadsafe(self.loop, self._wake)

    def _wake(self) -> None:
        for future in self._waiters:
            _settle(future)

    @property
    def _live(self) -> bool:
        return self.exchange.state in (_WAITING, _STREAMING)

    def refuse(self) -> None:
        """The bridge closed before this request started."""
        if self.inbox is not None:
            self.inbox.close()
        self.exchange.abort(http.client.RemoteDisconnected("the in-process bridge was closed"))

    async def run(self) -> None:
        import asyncio

        exchange = self.exchange
        try:
            await self.site.app(self.scope, self.receive, self.send)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: the process must survive
            if isinstance(exc, asyncio.CancelledError) and self.site.runner.closing:
                # close() cancelled the task: the connection drops, as at a
                # server's shutdown.
                exchange.abort(
                    _failure(exchange.name, "as its bridge closed", exc) if self.started
                    else http.client.RemoteDisconnected("the in-process bridge was closed"))
            else:
                exchange.fail(exc)
        else:
            # Back from the app with its caller gone: it saw http.disconnect
            # (or its caller timed out) and stopped, the normal end of a
            # stream nobody reads any more.
            if exchange.state == _WAITING:
                exchange.fail(RuntimeError(
                    "the ASGI app returned without sending http.response.start"))
            elif exchange.state == _STREAMING:
                exchange.fail(RuntimeError("the ASGI app returned without completing its "
                                           "response (more_body=False)"))
        finally:
            if self.inbox is not None:
                # Request bytes nobody will read are dropped, as a socket's
                # buffer would swallow them, so a caller still sending is freed.
                self.inbox.close()
            # Done with the loop: let the mounts (and so the loop) go with the
            # caller's last reference, with no cycle or late wake-up to wait for.
            exchange.on_leave = None
            self.keep = None

    def _sleeper(self) -> Tuple[Any, Callable[[], None]]:
        # A future for the loop to sleep on, and the wake that resolves it
        # from any thread.
        future = self.loop.create_future()
        return future, functools.partial(_threadsafe, self.loop, _settle, future)

    async def _sleep(self, future: Any) -> None:
        self._waiters.append(future)
        try:
            await future
        finally:
            self._waiters.remove(future)

    async def receive(self) -> Dict[str, Any]:
        if self._live:
            if self.body is not None:
                body, self.body = self.body, None
                return {"type": "http.request", "body": body, "more_body": False}
            if self.inbox is not None:
                message = await self._receive_chunk(self.inbox)
                if message is not None:
                    return message
            # The body is all in: the next event is the client leaving (or,
            # as uvicorn has it, the response being complete).
            while self._live:
                await self._sleep(self.loop.create_future())
        return {"type": "http.disconnect"}

    async def _receive_chunk(self, inbox: _LoopPipe) -> Optional[Dict[str, Any]]:
        while self._live:
            future, wake = self._sleeper()
            data = inbox.try_get(wake)
            if data is None:
                await self._sleep(future)
                continue
            more = not inbox.drained
            if data and more:
                return {"type": "http.request", "body": data, "more_body": True}
            self.inbox = None
            failed = inbox.failed
            inbox.close()
            if failed:
                return None  # the caller's body failed: the caller is gone
            return {"type": "http.request", "body": data, "more_body": False}
        return None

    async def send(self, message: Mapping[str, Any]) -> None:
        kind = message["type"]
        exchange = self.exchange
        if kind == "http.response.body":
            if not self.started:
                raise RuntimeError("ASGI app sent http.response.body before http.response.start")
            if self.finished:
                raise RuntimeError("ASGI app sent http.response.body after its response ended")
            body = message.get("body", b"")
            if type(body) is not bytes:
                if not isinstance(body, (bytearray, memoryview)):
                    raise TypeError("ASGI response body must be bytes, not %s"
                                    % type(body).__name__)
                body = bytes(body)
            more = message.get("more_body", False)
            if exchange.state == _LEFT and (more or not self._delivered(body)):
                # ASGI HTTP spec 2.4: send() on a closed connection raises an
                # OSError -- also when the body would not have been sent
                # (HEAD, 204, 304), so an app streaming into the void learns.
                raise BrokenPipeError(errno.EPIPE, "the caller has closed the response")
            if body and not self.no_body:
                if self.length is not None:
                    self.sent += len(body)
                    if self.sent > self.length:
                        raise RuntimeError("ASGI app sent more than its Content-Length")
                if exchange.call is None and exchange.fault is None:
                    await self._push(body)
                else:
                    await self._forward(body)
            elif more:
                # Nothing queued, so nothing waited: yield to the loop all the
                # same, or an app sending in a tight loop starves the others.
                import asyncio

                await asyncio.sleep(0)
            if not more:
                self.finished = True
                exchange.finish()
                self._wake()
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("ASGI app sent http.response.start twice")
            exchange.respond(*self._head(message))  # BrokenPipeError once the caller left
            self.started = True
        else:
            raise ValueError("unexpected ASGI message type %r in an http scope" % (kind,))

    def _delivered(self, body: bytes) -> bool:
        """Whether the caller has had all it was going to get, so that a last,
        empty message after it left is no error: no body was due (HEAD, 204,
        304), or all of a Content-Length body was sent."""
        return self.no_body or (not body and self.length is not None and self.sent >= self.length)

    def _head(self, message: Mapping[str, Any]) -> _Head:
        status = message["status"]
        if type(status) is not int or not 100 <= status <= 999:
            raise ValueError("bad ASGI status %r: want an int like 200" % (status,))
        headers: List[Tuple[str, str]] = []
        for pair in message.get("headers", ()):
            name, value = pair
            if not (isinstance(name, (bytes, bytearray))
                    and isinstance(value, (bytes, bytearray))):
                raise TypeError("ASGI response header %r: name and value must be bytes" % (pair,))
            field = _header_field(bytes(name).decode("latin-1"), bytes(value).decode("latin-1"),
                                  "ASGI", pair)
            if field[0].lower() == "content-length":
                # uvicorn drops the connection on a length that is no number,
                # or on two that differ (h11): no server sends such a head.
                text = field[1].strip()
                length = int(text) if text.isdecimal() else -1
                if length < 0 or self.length not in (None, length):
                    raise ValueError("bad ASGI response Content-Length %r" % (pair,))
                self.length = length
            headers.append(field)
        if status in (204, 304) or status < 200:
            self.no_body = True
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        return (status, reason, headers)

    async def _forward(self, body: bytes) -> None:
        # The exchange's forward(), awaited: a journal or a Fault is at work.
        exchange = self.exchange
        if exchange.fault is not None:
            await self._nap(exchange.fault.fault.chunk_delay)
        keep, action = exchange.account(body)
        if keep:
            await self._push(body[:keep])
        if action == "stall":
            while self._live:  # nothing more arrives until the caller gives up
                await self._sleep(self.loop.create_future())
            raise BrokenPipeError(errno.EPIPE, "the caller has closed the response")
        if action is not None:
            exchange.cut(action)

    async def _nap(self, seconds: float) -> None:
        # A Fault's delay, cut short when the caller leaves.
        if seconds > 0 and self._live:
            future = self.loop.create_future()
            handle = self.loop.call_later(seconds, _settle, future)
            try:
                await self._sleep(future)
            finally:
                handle.cancel()

    async def _push(self, data: bytes) -> None:
        """Queue ``data`` for the caller; while the pipe is full, sleep until
        the reader drains it -- other requests on the loop go on."""
        pipe = cast(_LoopPipe, self.exchange.pipe)
        if pipe.try_put(data, None):
            return
        while True:
            future, wake = self._sleeper()
            if pipe.try_put(data, wake):
                return
            await future



class _Site:
    """An ASGI app mounted on a bridge (under one name or several) and its
    lifespan: startup on the first mount, shutdown on the last unmount or at
    close.  The lifespan task runs in an empty context, not a caller's."""

    def __init__(self, runner: _ASGILoop, app: Any, name: str) -> None:
        self.runner = runner
        self.app = app
        self.name = name
        self.refs = 0
        self.starting: Any = None  # concurrent future of startup(); None without lifespan
        self.state: Optional[Dict[str, Any]] = None  # set by a completed startup
        self._task: Any = None
        self._started: Any = None  # loop futures
        self._stop: Any = None
        self._stopped: Any = None
        self._got_startup = False
        self._supported = False

    def after_fork(self) -> None:
        """In a forked child: the lifespan task lives on the parent's loop."""
        self._task = None

    async def startup(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._stop = loop.create_future()
        self._stopped = loop.create_future()
        state: Dict[str, Any] = {}
        self._task = contextvars.Context().run(loop.create_task, self._lifespan(state))
        try:
            failure = await asyncio.wait_for(asyncio.shield(self._started), LIFESPAN_TIMEOUT)
        except asyncio.TimeoutError:
            self._task.cancel()
            raise BridgeError("in-process app %r did not finish its lifespan startup within "
                              "%s seconds (if it does not speak lifespan, mount "
                              "ASGIApp(app, lifespan=False))" % (self.name, LIFESPAN_TIMEOUT)
                              ) from None
        if failure is not None:
            self._task.cancel()
            raise BridgeError("lifespan startup of in-process app %r failed: %s"
                              % (self.name, failure))
        if self._supported:
            self.state = state  # each request's scope gets a copy

    async def _lifespan(self, state: Dict[str, Any]) -> None:
        import asyncio

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": state}
        try:
            await self.app(scope, self._receive, self._send)
        except asyncio.CancelledError:
            pass  # startup failed or timed out, or the bridge closed
        except BaseException as exc:  # noqa: BLE001
            if not self._started.done():
                # The ASGI spec: an app that raises on the lifespan scope does
                # not support it; it is served without.
                if self._got_startup:
                    _log.warning("in-process app %r raised during its lifespan startup; it is "
                                 "served without lifespan", self.name,
                                 exc_info=(type(exc), exc, exc.__traceback__))
                else:
                    _log.debug("in-process app %r does not support lifespan: %r", self.name, exc)
            elif self._started.result() is not None:
                pass  # a failed startup: mount() raised with its message
            elif self._stop.done() and not self._stopped.done():
                _log.error("in-process app %r raised during its lifespan shutdown", self.name,
                           exc_info=(type(exc), exc, exc.__traceback__))
            else:
                _log.error("in-process app %r: its lifespan task raised", self.name,
                           exc_info=(type(exc), exc, exc.__traceback__))
        finally:
            _settle(self._started)
            _settle(self._stopped)

    async def _receive(self) -> Dict[str, Any]:
        import asyncio

        if not self._got_startup:
            self._got_startup = True
            return {"type": "lifespan.startup"}
        await asyncio.shield(self._stop)
        return {"type": "lifespan.shutdown"}

    async def _send(self, message: Mapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._supported = True
            _settle(self._started)
        elif kind == "lifespan.startup.failed":
            _settle(self._started, message.get("message") or "lifespan.startup.failed")
        elif kind == "lifespan.shutdown.complete":
            _settle(self._stopped)
        elif kind == "lifespan.shutdown.failed":
            _log.error("lifespan shutdown of in-process app %r failed: %s", self.name,
                       message.get("message", ""))
            _settle(self._stopped)
        else:
            raise ValueError("unexpected ASGI message type %r in a lifespan scope" % (kind,))

    async def shutdown(self) -> None:
        import asyncio

        task = self._task
        if task is None or task.done():
            return
        _settle(self._stop)
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), LIFESPAN_TIMEOUT)
        except asyncio.TimeoutError:
            _log.warning("in-process app %r did not finish its lifespan shutdown within %s "
                         "seconds", self.name, LIFESPAN_TIMEOUT)
            task.cancel()


class _ASGILoop:
    """The event loop a bridge runs its ASGI apps on, in a daemon thread
    started on first use.  ``close()`` (idempotent) cancels the requests
    still running, shuts the lifespans down, stops the loop and joins the
    thread; a ``weakref.finalize`` on the bridge's mounts calls it when they
    are collected or at interpreter exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loop: Any = None
        self.thread: Optional[threading.Thread] = None
        self.closed = False  # close() was called: no new work
        self.closing = False  # loop side: the shutdown has begun
        self.sites: Dict[int, _Site] = {}  # id(mounted app) -> its site
        self.tasks: Dict[Any, _ASGICall] = {}  # loop side: the requests running
        self.finalizer: Any = None  # set by _asgi_runner; calls close() once
        self._stale: List[Any] = []  # loops of the parent, after a fork
        _loops.add(self)

    def after_fork(self) -> None:
        """In a forked child: the loop's thread did not come along, so a new
        loop starts on the next request.  The apps' lifespan startup ran in
        the parent and its state came along; their shutdown is the parent's
        to run.  The parent's loop is kept, never closed or collected here:
        it still counts as running (in a thread this process does not
        have), and collecting it would only warn."""
        self._lock = threading.Lock()
        if self.loop is not None:
            self._stale.append(self.loop)
        self.loop = self.thread = None
        self.tasks = {}
        for site in self.sites.values():
            site.after_fork()

    def on_loop(self) -> bool:
        thread = self.thread
        return thread is not None and thread.ident == threading.get_ident()

    def _start(self) -> Any:
        # With self._lock held.
        if self.closed:
            raise BridgeError("this in-process bridge is closed: it runs no ASGI app any more")
        if self.loop is None:
            import asyncio

            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=self._main, args=(loop,),
                                      name="inproc_bridge-asgi", daemon=True)
            contextvars.Context().run(thread.start)  # as the workers: see _Workers.submit
            self.loop, self.thread = loop, thread
        return self.loop

    @staticmethod
    def _main(loop: Any) -> None:
        try:
            loop.run_forever()
        finally:
            loop.close()

    def submit(self, call: _ASGICall, ctx: contextvars.Context) -> None:
        with self._lock:  # so close() queues its shutdown after this
            loop = call.loop = self._start()
            # The handle runs in ctx, and the task it makes copies ctx: the
            # same on 3.8 to 3.13 (create_task's context= is 3.11+ only).
            loop.call_soon_threadsafe(self._spawn, call, context=ctx)

    def _spawn(self, call: _ASGICall) -> None:
        if self.closing:
            call.refuse()
            return
        task = self.loop.create_task(call.run())
        self.tasks[task] = call
        task.add_done_callback(self._forget)

    def _forget(self, task: Any) -> None:
        self.tasks.pop(task, None)

    def attach(self, app: Any, name: str) -> _Site:
        """The site for a newly mounted ``app``; its lifespan startup runs
        on the first mount and ``BridgeError`` says it failed."""
        import asyncio
        import concurrent.futures

        with self._lock:
            if self.closed:
                raise BridgeError("this in-process bridge is closed: it runs no ASGI app any more")
            site = self.sites.get(id(app))
            if site is None:
                site = _Site(self, app, name)
                if not (isinstance(app, ASGIApp) and not app.lifespan):
                    if self.on_loop():
                        raise BridgeError("cannot mount ASGI app %r from its bridge's own event "
                                          "loop: its lifespan startup would deadlock" % (name,))
                    site.starting = asyncio.run_coroutine_threadsafe(site.startup(), self._start())
                self.sites[id(app)] = site
            site.refs += 1
        starting = site.starting
        if starting is not None:
            try:
                if self.on_loop() and not starting.done():
                    raise BridgeError("cannot mount ASGI app %r from its bridge's own event loop "
                                      "while its lifespan starts" % (name,))
                starting.result(LIFESPAN_TIMEOUT + ASGI_CLOSE_GRACE)
            except BaseException as exc:
                with self._lock:
                    site.refs -= 1
                    if self.sites.get(id(app)) is site:
                        del self.sites[id(app)]  # a later mount tries again
                if isinstance(exc, BridgeError):
                    raise
                if isinstance(exc, concurrent.futures.CancelledError):
                    raise BridgeError("the in-process bridge was closed while ASGI app %r "
                                      "started" % (name,)) from None
                if isinstance(exc, concurrent.futures.TimeoutError):
                    raise BridgeError("the lifespan startup of ASGI app %r did not "
                                      "complete" % (name,)) from None
                raise BridgeError("the lifespan startup of ASGI app %r failed: %r"
                                  % (name, exc)) from exc
        return site

    def detach(self, site: _Site) -> None:
        """``site`` lost a mount; the last one runs its lifespan shutdown."""
        import asyncio

        with self._lock:
            site.refs -= 1
            if site.refs > 0 or self.sites.get(id(site.app)) is not site:
                return
            del self.sites[id(site.app)]
            if self.closed or site.starting is None:
                return
            done = asyncio.run_coroutine_threadsafe(site.shutdown(), self.loop)
        if self.on_loop():
            return  # it runs once the caller yields
        try:
            done.result(LIFESPAN_TIMEOUT + ASGI_CLOSE_GRACE)
        except BaseException as exc:  # noqa: BLE001 - the app is unmounted all the same
            _log.warning("lifespan shutdown of in-process app %r: %r", site.name, exc)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            loop, thread = self.loop, self.thread
            if loop is None or thread is None:
                return
            import asyncio

            asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        if thread.ident == threading.get_ident():
            return  # called on the loop (a finalizer, an app): the shutdown runs on its own
        thread.join(LIFESPAN_TIMEOUT + 3 * ASGI_CLOSE_GRACE)
        if thread.is_alive():
            _log.warning("the ASGI event loop of an in-process bridge did not stop in time")

    async def _shutdown(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self.closing = True
        try:
            # Requests first, as a server drains its connections before the
            # lifespan shutdown; then the lifespans; then what is left.  An
            # app whose response is complete may still be at work (a
            # background task, its own cleanup): it gets the grace period,
            # as a server's shutdown waits for it, before it is cancelled.
            # One still answering is cancelled at once.
            requests = list(self.tasks)
            answered = [task for task in requests if self.tasks[task].finished]
            for task in requests:
                if not self.tasks[task].finished:
                    task.cancel()
            if answered:
                await asyncio.wait(answered, timeout=ASGI_CLOSE_GRACE)
                for task in answered:
                    task.cancel()
            if requests:
                await asyncio.wait(requests, timeout=ASGI_CLOSE_GRACE)
            with self._lock:
                sites = [site for site in self.sites.values() if site.starting is not None]
                self.sites.clear()
            if sites:
                await asyncio.gather(*(site.shutdown() for site in sites), return_exceptions=True)
            current = asyncio.current_task()
            rest = [task for task in asyncio.all_tasks() if task is not current]
            for task in rest:
                task.cancel()
            if rest:
                await asyncio.wait(rest, timeout=ASGI_CLOSE_GRACE)
            await loop.shutdown_asyncgens()
        finally:
            loop.call_soon(loop.stop)




def _asgi_scope(request: _Request, exchange: _Exchange, site: _Site) -> Dict[str, Any]:
    """An ASGI HTTP scope built as a server would from the request."""
    raw_path, _, query = request.target.encode("ascii").partition(b"?")
    scope: Dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": request.scheme,
        "path": urllib.parse.unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in request.headers],
        "client": CLIENT_ADDRESS,
        "server": (request.host.strip("[]"), request.port),
        "extensions": {"inproc": {"source": exchange.source, "actor": exchange.actor}},
    }
    if site.state is not None:
        scope["state"] = dict(site.state)
    return scope


def _serve_asgi(bridge: InProcHandler, table: _Mounts, request: _Request, entry: _Entry,
                exchange: _Exchange, ctx: contextvars.Context) -> _Response:
    site: _Site = entry.asgi
    runner = site.runner
    if runner.on_loop():
        raise BridgeError(
            "a blocking in-process call to ASGI app %r from its own event loop would deadlock: "
            "make it from another thread (loop.run_in_executor)" % (entry.name,))
    call = _ASGICall(site, exchange, request, table)
    runner.submit(call, ctx)
    pipe: BodyPipe = exchange.pipe  # type: ignore[assignment]
    if call.inbox is not None:
        try:
            cast(_RequestBody, request.body).feed(call.inbox)
        except BaseException:
            pipe.close()
            raise
    head = exchange.await_head(request.timeout)
    return _build_response(head, io.BufferedReader(pipe), request.req, exchange)

# ---------------------------------------------------------------------------
# App adapters: a remote mount (the app moved behind a real server)
# ---------------------------------------------------------------------------
#
# A URL mounted in place of an app: the caller's thread sends the request
# with the opener's own HTTP handlers (TLS, proxies, timeouts as for any
# URL), takes the head, and a worker pumps the body into the exchange's pipe
# -- so the caller, the journal, faults and drain see a remote exchange as
# any other.  With a key, the source and actor travel as signed Inproc-*
# headers that trusted() checks on the far side.

#: The headers a remote mount signs with; a caller's own copies never leave.
_SIGNED_HEADERS = ("Inproc-Source", "Inproc-Actor", "Inproc-Time", "Inproc-Signature")
_DENIED = b"This request is not signed by an inproc_bridge remote mount with this service's key."


class _Remote:
    """A URL mounted in place of an app, and the key its requests are
    signed with."""

    __slots__ = ("url", "origin", "base", "key")

    def __init__(self, url: str, key: Optional[bytes]) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("a remote mount wants an http:// or https:// URL, not %r (scheme %r)"
                             % (url, parts.scheme))
        if parts.query or parts.fragment or parts.username is not None:
            raise ValueError("a remote mount's URL is a base: no user, query or fragment, not "
                             "%r" % (urllib.parse.urlunsplit(parts._replace(
                                 netloc=parts.hostname or "")),))
        try:
            parts.port  # noqa: B018 - urllib's check of the port
        except ValueError as exc:
            raise ValueError("a remote mount's URL has a bad port: %s" % (exc,)) from None
        self.url = url
        self.origin = "%s://%s" % (parts.scheme, parts.netloc)
        self.base = parts.path.rstrip("/")
        self.key = key

    def __repr__(self) -> str:
        return "<remote mount %s%s>" % (self.url, " (signed)" if self.key else "")


def _canonical_target(path: str, query: str) -> str:
    # What is signed of the request target: the path with its escapes
    # decoded as PEP 3333 decodes them (so a server that unquotes PATH_INFO
    # checks the same text), length first -- a decoded "?" or newline in it
    # cannot pass for the query -- then the query as sent.
    path = urllib.parse.unquote(path, "iso-8859-1")
    return "%d:%s\n%s" % (len(path), path, query)


def _signature(key: bytes, stamp: str, method: str, target: str, source: Optional[str],
               actor: Optional[str]) -> str:
    """HMAC-SHA256 of one request as both sides see it; a tag that is not
    there is signed as absent, so one added on the way does not verify."""
    fields = ["inproc-bridge/1", stamp, method, target,
              "-" if source is None else "+" + source, "-" if actor is None else "+" + actor]
    return hmac.new(key, "\n".join(fields).encode("utf-8"), hashlib.sha256).hexdigest()


def _serve_remote(bridge: InProcHandler, table: _Mounts, request: _Request, entry: _Entry,
                  exchange: _Exchange, ctx: contextvars.Context) -> _Response:
    remote: _Remote = entry.app
    req = request.req
    path, _, query = request.target.partition("?")
    target = remote.base + request.target
    out = urllib.request.Request(remote.origin + target, data=req.data, method=request.method)
    for name, value in request.headers:
        lower = name.lower()
        # (Inproc_Source too: a WSGI server reads it as HTTP_INPROC_SOURCE.)
        if lower not in ("host", "connection") and not lower.replace("_", "-").startswith(
                "inproc-"):
            out.add_unredirected_header(name, value)
    if remote.key is not None:
        source = exchange.source
        actor = None if exchange.actor is None else str(exchange.actor)
        stamp = str(int(time.time()))
        signature = _signature(remote.key, stamp, request.method,
                               _canonical_target(remote.base + path, query), source, actor)
        for field, tag in zip(_SIGNED_HEADERS, (source, actor, stamp, signature)):
            if tag is not None:
                out.add_unredirected_header(field, tag)
    out.timeout = req.timeout
    resp = bridge.network(out)
    exchange.remote = True  # its redirects are the caller's to see, not to follow
    exchange.pipe = BodyPipe(read_timeout=request.timeout, on_close=exchange.leave)
    head = (resp.status, resp.reason, list(resp.getheaders()))
    start = time.monotonic()
    try:
        exchange.respond(*head)
        if exchange.fault is not None:
            exchange.hold_head(None if request.timeout is None else start + request.timeout)
    except BaseException:
        resp.close()
        exchange.pipe.close()
        raise

    def pump() -> None:
        try:
            while request.method != "HEAD":
                data = resp.read1(_RECEIVE_LIMIT)
                if not data:
                    break
                exchange.forward(data)
        except BaseException as exc:  # noqa: BLE001 - the far end's failure is the caller's
            exchange.relay(exc)
        else:
            exchange.finish()
        finally:
            resp.close()

    _workers.submit(lambda: ctx.run(pump))
    return _build_response(head, io.BufferedReader(exchange.pipe), req, exchange)


# ---------------------------------------------------------------------------
# What the caller gets: the response object
# ---------------------------------------------------------------------------


class _Holder:
    """Gives ``HTTPResponse.__init__`` the file it asks its socket for."""

    __slots__ = ("file",)

    def __init__(self, file: io.BufferedIOBase) -> None:
        self.file = file

    def makefile(self, mode: str = "rb") -> io.BufferedIOBase:
        return self.file


class _Body(io.BytesIO):
    """A body that is all there: what http.client asks of its file, ``peek``
    included, without a reader thread or a buffer copy."""

    def peek(self, size: int = 0) -> bytes:
        return self.getvalue()[self.tell():]


# 3.9's http.client reports the unfilled end of its buffer as the partial of
# a chunk it could not finish: there those bytes are lost, as they are from
# http.client over a socket.
_PARTIAL_KEPT = sys.version_info[:2] != (3, 9)


class _Response(http.client.HTTPResponse):
    """The response the bridge hands out: ``http.client``'s own class, with
    two promises added.  A body that ends before its Content-Length raises
    ``IncompleteRead`` from every read method (http.client's ``read(amt)``
    would return short data quietly), and a response dropped unclosed warns
    (``ResourceWarning``) and releases the app, as an unclosed socket does."""

    def begin(self, *args: Any, **kwargs: Any) -> None:
        # *args: 3.15's getresponse() passes _max_headers (HTTPConnection's
        # max_response_headers) when one is set.
        try:
            if args or kwargs or self.debuglevel or not self._begin_fast():
                super().begin(*args, **kwargs)
        except BaseException:
            self.close()  # releases the app: the caller never gets this response
            raise

    def _begin_fast(self) -> bool:
        """What ``begin()`` does, for the plain head a handler class writes
        -- ``HTTP/1.x NNN reason``, ``Name: value`` lines, all of it in the
        first chunk -- without http.client's email-based parser (a third of
        the caller's CPU work for a small request).  False, having read
        nothing, for anything else: http.client then reads it as always, so
        every unusual head still gets its exact treatment and errors."""
        fp: Any = self.fp
        data = fp.peek(1)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = data[:end].decode("latin-1").split("\r\n")
        status = _STATUS_LINE.fullmatch(lines[0])
        # (lines: the status line and the fields; http.client counts the
        # fields and the blank line that ends them.)
        if status is None or status.group(2) == "100" or len(lines) > _max_headers():
            return False  # 100 Continue: skipped by http.client's own loop
        headers = []
        for line in lines[1:]:
            field = _HEADER_LINE.fullmatch(line)
            if field is None:
                return False  # obs-fold, a stray CR or LF, a name that is no token
            headers.append(field.groups())
        fp.read(end + 4)
        version, code, reason = status.groups()
        self.code = self.status = int(code)
        self.reason = (reason or "").strip()
        self.version = 10 if version == "HTTP/1.0" else 11
        msg = http.client.HTTPMessage()
        msg._headers = headers  # type: ignore[attr-defined]  # as _build_response
        self.headers = self.msg = msg
        # The rest is begin()'s, with the first of each header as msg.get()
        # would find it.
        first: Dict[str, str] = {}
        for name, value in headers:
            first.setdefault(name.lower(), value)
        self.chunked = first.get("transfer-encoding", "").lower() == "chunked"
        self.chunk_left = None
        conn = first.get("connection", "").lower()
        if self.version == 11:
            self.will_close = "close" in conn
        else:
            self.will_close = not (first.get("keep-alive") or "keep-alive" in conn
                                   or "keep-alive" in first.get("proxy-connection", "").lower())
        self.length = None
        length = first.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                pass
            else:
                if self.length < 0:
                    self.length = None
        if self.status in (204, 304) or self.status < 200 or self._method == "HEAD":  # type: ignore[attr-defined]
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True
        return True

    _exchange: Optional[_Exchange] = None  # set by whoever makes it

    def _reading(self) -> bool:
        """Whether the body is still open -- ``drain()``'s cancel of an
        answer read only in part raises here, also for bytes already in
        this response's buffer."""
        if self.fp is None:
            return False
        exchange = self._exchange
        if exchange is not None and exchange.dropped is not None:
            raise exchange.dropped
        return True

    def _ended_short(self, data: bytes = b"") -> None:
        exchange = self._exchange
        if exchange is not None and exchange.short is not None:
            raise http.client.IncompleteRead(data)  # a Fault cut the body
        if self.length and not self.chunked and self._method != "HEAD":  # type: ignore[attr-defined]
            raise http.client.IncompleteRead(b"", self.length)

    def _cut_read(self, read: Callable[..., Any], *args: Any) -> Any:
        # http.client's chunked reader, cut mid-chunk, drops the bytes it had
        # of that chunk from its IncompleteRead; after a Fault's cut they are
        # put back, so the caller learns of every byte it was sent.
        try:
            return read(*args)
        except http.client.IncompleteRead as exc:
            # (raised "from exc" on 3.11+, inside its handler before; never
            # one this method raised itself -- that one suppresses its context)
            inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
            if self._exchange is None or self._exchange.short is None or not isinstance(
                    inner, http.client.IncompleteRead) or not _PARTIAL_KEPT:
                raise
            raise http.client.IncompleteRead(exc.partial + inner.partial) from None

    def read(self, amt: Optional[int] = None) -> bytes:
        live = self.fp is not None
        exchange = self._exchange
        if exchange is not None and exchange.dropped is not None and live:
            raise exchange.dropped  # (_reading(), written out: every response's path)
        if exchange is None or exchange.fault is None:  # no Fault: the usual case
            data: bytes = super().read(amt)
        else:
            data = self._cut_read(super().read, amt)
            if live and data and (amt is None or amt < 0) and exchange.short is not None:
                self._ended_short(data)  # all of it, read to the cut: IncompleteRead keeps it
        if live and not data and amt != 0:
            self._ended_short()
        return data

    def readinto(self, b: Any) -> int:
        live = self._reading()
        exchange = self._exchange
        if exchange is not None and exchange.fault is not None:
            n: int = self._cut_read(super().readinto, b)
        else:
            n = super().readinto(b)
        if live and not n and len(memoryview(b)):
            self._ended_short()
        return n

    def read1(self, n: int = -1) -> bytes:
        live = self._reading()
        data = super().read1(n)
        if live and not data and n:
            self._ended_short()
        return data

    def readline(self, limit: Optional[int] = -1) -> bytes:
        live = self._reading()
        data = super().readline(-1 if limit is None else limit)
        if live and not data and limit:
            self._ended_short()
        return data

    def __del__(self) -> None:
        # Warn only for a response that still holds its app: one whose body
        # is all in memory has nothing left to release.  Error responses are
        # dropped by urllib itself (its auth handlers retry past a 401
        # without closing it), so they release their app without blaming the
        # caller.
        fp = getattr(self, "fp", None)
        status = getattr(self, "status", None)
        if fp is not None and not isinstance(fp, _Body) and not (
                isinstance(status, int) and status >= 400):
            warnings.warn(
                "unclosed in-process response %r" % (getattr(self, "url", None),),
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
        super().__del__()


# A head _Response reads without http.client's parser; anything else it
# leaves to http.client.  Field values lose their leading spaces and tabs,
# as http.client's parser strips them.
_STATUS_LINE = re.compile(r"(HTTP/1\.[0-9]) ([1-9][0-9][0-9])(?: (.*))?")
_HEADER_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*)")


def _max_headers() -> int:
    # http.client's limits on a response head, applied to the heads the
    # bridge reads without it, so an app gets the same error on every path.
    # Read from http.client each time: they are its to change.  It counts the
    # blank line that ends a head with the fields: a head may hold one field
    # fewer than the limit.
    limit: int = getattr(http.client, "_MAXHEADERS", 100)
    return limit


def _build_response(head: _Head, file: io.BufferedIOBase, req: urllib.request.Request,
                    exchange: _Exchange) -> _Response:
    code, reason, headers = head
    max_headers = _max_headers()
    max_line = getattr(http.client, "_MAXLINE", 65536)
    try:
        if len(headers) >= max_headers:  # the fields and the blank line, as http.client counts
            raise http.client.HTTPException("got more than %d headers" % max_headers)
        for name, value in headers:
            if len(name) + len(value) + 4 > max_line:
                raise http.client.LineTooLong("header line")
    except http.client.HTTPException:
        file.close()  # releases the app
        raise
    method = exchange.method
    resp = _Response(_Holder(file), method=method)  # type: ignore[arg-type]
    resp._exchange = exchange
    msg = http.client.HTTPMessage()
    # What msg[name] = value stores under the compat32 policy HTTPMessage
    # uses, without its per-header policy calls (~1 us a request).
    msg._headers = headers  # type: ignore[attr-defined]
    resp.version = 11
    resp.status = resp.code = code  # begin() sets it
    resp.reason = reason
    resp.headers = resp.msg = msg
    resp.chunked = False
    resp.will_close = True
    length: Optional[int] = None
    if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
        length = 0
    else:
        declared = exchange.declared  # the first Content-Length, as msg.get() finds it
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = None
            else:
                if length < 0:
                    length = None
    resp.length = length
    # What urllib's do_open does to every HTTP response.
    resp.url = req.get_full_url()
    resp.msg = reason  # type: ignore[assignment]
    return resp



def _answer(request: _Request, exchange: _Exchange, status: int) -> _Response:
    """An answer the bridge gives without calling the app (a Fault's
    status), empty-bodied: outcome "refused"."""
    head = (status, http.client.responses.get(status, ""),
            [("Content-Length", "0"), ("Date", _http_date())])
    exchange.declared = "0"
    if exchange.call is not None:
        exchange.call._head(head)
        exchange.call._end("refused")
    return _build_response(head, _Body(b""), request.req, exchange)


_Connection.response_class = _Response

# ---------------------------------------------------------------------------
# Mounts and dispatch
# ---------------------------------------------------------------------------

#: How each app kind is served: the adapters above, by ``_app_kind``'s names.
_SERVE: Dict[str, Callable[..., _Response]] = {
    "handler": _serve_handler,
    "wsgi": _serve_wsgi,
    "asgi": _serve_asgi,
    "remote": _serve_remote,
}


class _Entry:
    """One mount: the name it was mounted as, the app and how to serve it."""

    __slots__ = ("name", "app", "kind", "server", "asgi", "serve", "fault", "fault_left")

    def __init__(self, name: str, app: Any, kind: str, server: Any,
                 fault: Optional[Fault]) -> None:
        self.name = name
        self.app = app
        self.kind = kind
        self.server = server
        self.asgi: Any = None  # an ASGI app's _Site on its table's loop
        self.serve = _SERVE[kind]
        self.fault = fault
        self.fault_left = None if fault is None else fault.times

    def take_fault(self) -> Optional[Fault]:
        """The fault this request gets, if any: ``times`` counts down."""
        fault = self.fault
        if fault is not None and fault.times is not None:
            with _LOCK:
                if not self.fault_left:
                    return None
                self.fault_left -= 1
        return fault


def _app_kind(app: Any) -> str:
    """Which adapter serves ``app``: "handler", "asgi" or "wsgi"."""
    target = app
    while isinstance(target, functools.partial):
        target = target.func
    if isinstance(target, type) and issubclass(target, socketserver.BaseRequestHandler):
        return "handler"
    if isinstance(app, (str, _Remote)):
        return "remote"
    if _is_asgi(app):  # before WSGI: both are callables
        return "asgi"
    if callable(app):
        return "wsgi"
    raise TypeError(
        "cannot mount %r: want a BaseHTTPRequestHandler subclass (or a partial of one), "
        "a WSGI callable or an ASGI 3 app" % (app,)
    )


@functools.lru_cache(maxsize=256)
def _split_host(host: str) -> Tuple[str, Optional[int]]:
    """``host[:port]`` -> (lower-case host, port or None); BridgeError if bad."""
    if not host:
        raise BridgeError("no host given")
    if not host.isascii():
        raise BridgeError("host %r is not ASCII: mount names are ASCII host names" % (host,))
    match = _HOST.fullmatch(host)
    if match is None:
        raise BridgeError("bad host %r" % (host,))
    name, port = match.groups()
    if port and (len(port) > 5 or int(port) > 65535):
        raise BridgeError("bad port in %r" % (host,))
    return name.lower(), int(port) if port else None


class _Mounts:
    """Mount name -> app, shared by a handler and the openers a factory hands
    out, and the owner of the event loop its ASGI apps run on.
    Copy-on-write: a lookup is one dict read, with no lock; ``add`` and
    ``remove`` swap in a new dict, so a request finishes on the app it
    started with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.table: Dict[Tuple[str, Optional[int]], _Entry] = {}
        self._asgi: Optional[_ASGILoop] = None  # made on the first ASGI mount
        self.live: Set[_Exchange] = set()  # exchanges in flight, for drain()
        self.draining = False  # drain() began: every new request gets 503
        self._idle: Optional[threading.Event] = None  # set once nothing is live, while draining
        _tables.add(self)

    def forget(self, exchange: _Exchange) -> None:
        """``exchange`` is no longer in flight."""
        self.live.discard(exchange)
        idle = self._idle
        if idle is not None and not self.live:
            idle.set()

    def drain(self, timeout: float) -> int:
        """See ``InProcHandler.drain``."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError("drain() wants a timeout in seconds >= 0, not %r" % (timeout,))
        with self._lock:
            self.draining = True
            if self._idle is None:
                self._idle = threading.Event()
        if self.live:
            self._idle.wait(timeout)
        error = ConnectionAbortedError(errno.ECONNABORTED, "the in-process bridge was drained: "
                                       "this exchange did not end in time")
        cancelled = sum(1 for exchange in list(self.live) if exchange.cancel(error))
        self.close()
        return cancelled

    def runner(self) -> _ASGILoop:
        """The loop this table's ASGI apps run on; ``close()`` (or the
        table's collection) stops it."""
        runner = self._asgi
        if runner is None:
            with self._lock:
                runner = self._asgi
                if runner is None:
                    runner = self._asgi = _ASGILoop()
                    runner.finalizer = weakref.finalize(self, runner.close)
        return runner

    def after_fork(self) -> None:
        """In a forked child: a mount under way in another thread at fork
        time left the lock held; the table itself was swapped whole.  The
        exchanges in flight are the parent's: a drain here does not wait
        for them."""
        self._lock = threading.Lock()
        self.live = set()

    def add(self, name: str, app: Any, server: Any = None, fault: Optional[Fault] = None,
            secret: Optional[bytes] = None) -> None:
        if fault is not None and not isinstance(fault, Fault):
            raise TypeError("fault must be an inproc_bridge.Fault, not %r" % (fault,))
        if secret is not None and not isinstance(secret, bytes):
            raise TypeError("a remote mount's key must be bytes, not %s" % type(secret).__name__)
        if isinstance(app, str):
            if secret is not None and not secret:
                # b"" is no secret: anyone could sign a request as any source
                # and actor, and the trusted() side could not tell.
                raise ValueError("a remote mount's key must not be empty: with b'' anyone can "
                                 "sign a request (key=None sends no Inproc-* tags)")
            app = _Remote(app, secret)
        elif secret is not None:
            raise TypeError("key= signs a remote mount: mount a URL with it, not %r" % (app,))
        if not isinstance(name, str):
            raise TypeError("mount name must be a str, not %s" % type(name).__name__)
        try:
            key = _split_host(name)
        except BridgeError as exc:
            raise ValueError(
                "cannot mount %r (%s): a mount name is the host part of a URL -- ASCII, "
                "no '/', '?', '#', '@' or spaces, an IPv6 address in brackets -- optionally "
                "with ':port' (0-65535), e.g. 'api' or 'api.internal:8443'" % (name, exc.reason)
            ) from None
        kind = _app_kind(app)
        if server is None and kind == "handler":
            server = _StubServer(key[0], key[1] or 80)
        entry = _Entry(name, app, kind, server, fault)
        # A drained table answers 503 without calling any app: an ASGI app
        # mounted after drain() gets no lifespan startup and no loop (drain
        # closed it) and is refused with 503, as every other kind is.
        if kind == "asgi" and not self.draining:  # lifespan startup; BridgeError if it fails
            try:
                entry.asgi = self.runner().attach(app, name)
            except BridgeError:
                if not self.draining:
                    raise  # (else drain() began meanwhile and closed the loop: as above)
        with self._lock:
            table = dict(self.table)
            old = table.get(key)
            table[key] = entry
            self.table = table
        if old is not None and old.asgi is not None:  # the replaced app's lifespan shutdown
            old.asgi.runner.detach(old.asgi)

    def remove(self, name: str) -> None:
        try:
            key = _split_host(name)
        except BridgeError:
            raise KeyError(name) from None
        with self._lock:
            if key not in self.table:
                raise KeyError(name)
            table = dict(self.table)
            old = table.pop(key)
            self.table = table
        if old.asgi is not None:  # lifespan shutdown once no name serves it
            old.asgi.runner.detach(old.asgi)

    def find(self, host: str, scheme: str) -> Optional[_Entry]:
        name, port = _split_host(host)
        table = self.table
        entry = table.get((name, port))
        if entry is None:
            default = _DEFAULT_PORTS.get(scheme)
            if port is None and default is not None:
                entry = table.get((name, default))
            elif port is not None and port == default:
                entry = table.get((name, None))
        return entry

    def __bool__(self) -> bool:
        return bool(self.table)

    def close(self) -> None:
        """Cancel the ASGI requests still running, run the lifespan
        shutdown of the ASGI apps, stop the event-loop thread.  Idempotent;
        ASGI apps can be neither mounted nor called afterwards."""
        self.runner().finalizer()  # runs close() once, then never again

# ---------------------------------------------------------------------------
# The urllib handler
# ---------------------------------------------------------------------------


def _join(base: str, ref: str) -> str:
    # urljoin() leaves schemes it does not know alone, so join inproc URLs as
    # http ones and put the scheme back.
    scheme = urllib.parse.urlsplit(base).scheme
    if scheme != "inproc" or urllib.parse.urlsplit(ref).scheme:
        return urllib.parse.urljoin(base, ref)
    return "inproc" + urllib.parse.urljoin("http" + base[len(scheme):], ref)[len("http"):]


class InProcHandler(urllib.request.BaseHandler):
    """A urllib handler that serves ``inproc://NAME/...`` URLs -- and, with
    ``intercept_http=True``, ``http://NAME/...`` and ``https://NAME/...`` --
    by calling the app mounted as ``NAME`` in this process.

    ``apps`` maps mount names (host names, optionally ``host:port``; matched
    case-insensitively) to apps: a ``BaseHTTPRequestHandler`` subclass (or a
    ``functools.partial`` of one), an ASGI 3 app (a coroutine function or an
    object with an ``async def __call__``; wrap anything else in
    ``ASGIApp``) or a WSGI callable (any other callable).  ``source`` and
    ``actor`` tag every request this handler serves; apps read them with
    ``current_source()`` and ``current_actor()``.

    Add it to an opener with ``urllib.request.build_opener(handler)``; the
    opener's processors for ``http`` (cookies, auth, redirects, errors) apply
    to ``inproc://`` requests too.
    """

    # Before ProxyHandler (100): an in-process host is never sent to a proxy.
    handler_order = 90

    def __init__(self, apps: Union[Mapping[str, Any], _Mounts, None] = None, *,
                 source: Optional[str] = None, actor: Any = None,
                 intercept_http: bool = False, record: Any = False) -> None:
        # An OpenerFactory's opener gets the factory's table (and its close()).
        self._owns_mounts = not isinstance(apps, _Mounts)
        if isinstance(apps, _Mounts):
            self._mounts = apps
        else:
            self._mounts = _Mounts()
            for name, app in (apps or {}).items():
                self._mounts.add(name, app)
        self.source: Optional[Source] = None if source is None else Source(source)
        self.actor = actor
        self.intercept_http = intercept_http
        #: The call journal (``record=``), or None.
        self.calls = _journal(record)
        self._debuglevel = 0

    def mount(self, name: str, app: Any, *, server: Any = None,
              fault: Optional[Fault] = None, key: Optional[bytes] = None) -> None:
        """Serve ``app`` as ``name``, replacing any app mounted there
        atomically: requests in flight finish on the app they started with.
        A handler class sees ``server`` as ``self.server``; ``fault`` is a
        ``Fault`` its requests get (remounting without it clears it).  An
        ``http(s)://`` URL as ``app`` is a remote mount: requests go there,
        signed with ``key`` (non-empty bytes) when one is given."""
        self._mounts.add(name, app, server, fault, key)

    def unmount(self, name: str) -> None:
        """Stop serving ``name``; ``KeyError`` if nothing is mounted there."""
        self._mounts.remove(name)

    def close(self) -> None:
        """Stop what this bridge runs for ASGI apps: cancel their requests
        still running, run their lifespan shutdown, stop the event-loop
        thread.  Idempotent; also done when the bridge is garbage-collected
        and at interpreter exit.  Handler classes and WSGI apps own nothing
        and go on serving; ASGI apps can be neither mounted nor called
        afterwards (``BridgeError``).  On a handler of an ``OpenerFactory``
        opener it does nothing: the factory's ``close()`` owns the loop."""
        if self._owns_mounts:
            self._mounts.close()

    def drain(self, timeout: float) -> int:
        """Shut down gracefully: from now on every new request gets ``503``
        without reaching its app; exchanges in flight get up to ``timeout``
        seconds to end (read to the end or closed by their caller); the rest
        are cancelled -- their callers' reads raise, their apps see their
        caller leave -- and their number is returned.  Then ``close()``.
        On an ``OpenerFactory`` opener's handler it drains the factory."""
        return self._mounts.drain(timeout)

    def __enter__(self) -> InProcHandler:
        return self

    def sharing(self, *, intercept_http: bool = False, record: Any = False) -> InProcHandler:
        """A new handler over this one's mounts, with its source and actor
        (and its call journal unless ``record`` asks for another): what
        ``intercept(handler)`` serves with.  ``close()`` stays this one's."""
        return InProcHandler(self._mounts, source=self.source, actor=self.actor,
                             intercept_http=intercept_http, record=record or self.calls)

    def serves_host(self, host: str, scheme: str) -> bool:
        """Whether a request for ``host`` (``name`` or ``name:port``) over
        ``scheme`` would reach an app mounted here."""
        try:
            return self._mounts.find(host, scheme) is not None
        except BridgeError:
            return False  # not a name we could have mounted

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def network(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        """Open ``req`` with the opener's own handlers for its scheme (a
        proxy, TLS), without this bridge and without the opener's
        processors: what a remote mount sends its requests with."""
        for handler in self.parent.handle_open.get(req.type, ()):  # type: ignore[attr-defined]
            if handler is not self:
                resp = getattr(handler, req.type + "_open")(req)
                if resp is not None:
                    return resp  # type: ignore[no-any-return]
        raise BridgeError("this opener has no handler for %s:// URLs" % (req.type,))

    # -- urllib entry points -----------------------------------------------

    def inproc_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        """Serve an ``inproc://`` request (called by ``OpenerDirector``)."""
        entry = self._mounts.find(req.host, "inproc")
        if entry is None:
            raise BridgeError("no in-process app is mounted as %r" % (req.host,))
        return self._serve(req, entry)  # type: ignore[no-any-return]

    def http_open(self, req: urllib.request.Request) -> Optional[http.client.HTTPResponse]:
        """Serve an ``http(s)://`` request in-process when interception is on
        and its host is a mount name; otherwise leave it to urllib."""
        if not self.intercept_http:
            return None
        try:
            entry = self._mounts.find(req.host, req.type)
        except BridgeError:
            return None  # not a name we could have mounted: the network's
        if entry is None:
            return None
        return self._serve(req, entry)  # type: ignore[no-any-return]

    https_open = http_open

    def inproc_request(self, req: urllib.request.Request) -> urllib.request.Request:
        """Run the opener's ``http`` request processors (default headers,
        cookies, ...) on an ``inproc://`` request."""
        parent: Any = self.parent
        for processor in parent.process_request.get("http", ()):
            req = processor.http_request(req)
        return req

    def inproc_response(self, req: urllib.request.Request, response: Any) -> Any:
        """Run the opener's ``http`` response processors (errors, redirects,
        cookies, ...) on an ``inproc://`` response."""
        parent: Any = self.parent
        for processor in parent.process_response.get("http", ()):
            response = processor.http_response(req, response)
        return response

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                       headers: Any) -> Any:
        """Redirects: an in-process app's redirect to ``inproc://`` is
        followed under the opener's own redirect handler's rules; a network
        response may never redirect into the bridge."""
        location = headers.get("location") or headers.get("uri")
        if location is None:
            return None
        parts = urllib.parse.urlparse(location)
        if not parts.path and parts.netloc:
            parts = parts._replace(path="/")
        target = _join(
            req.full_url,
            urllib.parse.quote(urllib.parse.urlunparse(parts), encoding="iso-8859-1",
                               safe=string.punctuation),
        )
        if isinstance(fp, _Response) and fp._exchange is not None and fp._exchange.remote:
            # A remote mount's answer came over the network: the caller sees
            # it as it came, never followed (and never into the bridge).
            raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)
        if not isinstance(fp, _Response):
            if self._serves(target):
                raise urllib.error.HTTPError(
                    req.full_url, code,
                    "%s - a network response may not redirect into the in-process "
                    "bridge (%s)" % (msg, target),
                    headers, fp)
            return None
        if urllib.parse.urlsplit(target).scheme != "inproc":
            return None  # http(s)/ftp: the opener's redirect handler follows it
        redirector = None
        for handler in self.parent.handle_error.get("http", {}).get(code, ()):  # type: ignore[attr-defined]
            if handler is not self and hasattr(handler, "redirect_request"):
                redirector = handler
                break
        if redirector is None:
            return None
        new = redirector.redirect_request(req, fp, code, msg, headers, target)
        if new is None:
            # Declined: what urllib's default error handler then raises (the
            # opener's own redirect handler must not see an inproc URL).
            raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)
        chain: Any = req  # urllib counts redirects in an attribute of the request
        if hasattr(chain, "redirect_dict"):
            visited = new.redirect_dict = chain.redirect_dict
            if (visited.get(target, 0) >= redirector.max_repeats
                    or len(visited) >= redirector.max_redirections):
                raise urllib.error.HTTPError(req.full_url, code, redirector.inf_msg + msg,
                                             headers, fp)
        else:
            visited = new.redirect_dict = chain.redirect_dict = {}
        visited[target] = visited.get(target, 0) + 1
        fp.read()
        fp.close()
        return self.parent.open(new, timeout=req.timeout)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    # -- dispatch -----------------------------------------------------------

    def _serves(self, url: str) -> bool:
        # Judge the URL as urllib will open it: Request() un-percent-encodes
        # the host, so http://api%2einternal/ must count as api.internal.
        try:
            probe = urllib.request.Request(url)
        except ValueError:
            return False  # urllib cannot open it either
        if probe.type == "inproc":
            return True
        if not (self.intercept_http and probe.type in ("http", "https")):
            return False
        try:
            return self._mounts.find(probe.host, probe.type) is not None
        except BridgeError:
            return False

    def serve_raw(self, req: urllib.request.Request, raw: bytes, whole: bool) -> Any:
        """Serve a request ``intercept()`` takes off an ``http.client``
        connection (``req`` its parsed head, ``raw`` its bytes so far, all of
        it when ``whole``): a handler class starts on its head and reads the
        rest as it comes (the ``_HandlerRun`` is returned); other apps wait
        for the whole request (``False`` until then) and give a response.
        ``None``: not mounted here."""
        try:
            entry = self._mounts.find(req.host, req.type)
        except BridgeError:
            return None
        if entry is None:
            return None
        if entry.kind != "handler" and not whole:
            return False
        return self._serve(req, entry, raw if entry.kind == "handler" else None)

    def _serve(self, req: urllib.request.Request, entry: _Entry,
               raw: Optional[bytes] = None) -> Any:
        request = _Request(req)
        exchange = _Exchange(entry.name, self.source, self.actor, request.method)
        journal = self.calls
        if journal is not None:
            call = exchange.call = Call(req.full_url, entry.name, request, self.source, self.actor)
            journal._add(call)
            if isinstance(request.body, _RequestBody):
                request.body.call = call
        table = self._mounts
        if table.draining:
            return _answer(request, exchange, 503)
        if entry.fault is not None:
            fault = entry.take_fault()
            if fault is not None and fault.status is not None:
                if fault.delay:
                    # A slow refusal: the head comes ``delay`` late, or the
                    # caller's timeout passes first, as for an app's head.
                    exchange.fault = _FaultRun(fault)
                    exchange.head_at = time.monotonic()
                    exchange.hold_head(None if request.timeout is None
                                       else exchange.head_at + request.timeout)
                    exchange.fault = None
                return _answer(request, exchange, fault.status)
            exchange.fault = None if fault is None else _FaultRun(fault)
        # The app runs in a copy of the caller's context, on whichever thread.
        ctx = contextvars.copy_context()
        ctx.run(_exchange.set, exchange)
        exchange.table = table
        table.live.add(exchange)
        if table.draining:  # drain() began in between: it may not have seen this one
            table.forget(exchange)
            return _answer(request, exchange, 503)
        try:
            if raw is not None:
                return _serve_raw(request, entry, exchange, ctx, raw)
            return entry.serve(self, table, request, entry, exchange, ctx)
        except BaseException:
            exchange.leave()  # no response for the caller to close: not in flight
            raise


# ---------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------


# What build_opener() builds with, by the names it looks them up by.
# opener_for() copies an opener of these (_copy_opener) only while urllib's
# names still mean what they meant at import: a program that replaced one
# (or build_opener itself, as a mock does) gets what build_opener() makes.
_URLLIB_NAMES = ("build_opener", "OpenerDirector", "ProxyHandler", "UnknownHandler",
                 "HTTPHandler", "HTTPDefaultErrorHandler", "HTTPRedirectHandler", "FTPHandler",
                 "FileHandler", "HTTPErrorProcessor", "DataHandler", "HTTPSHandler")


def _urllib_defaults() -> Tuple[Any, ...]:
    return tuple(getattr(urllib.request, name, None) for name in _URLLIB_NAMES)


_URLLIB_DEFAULTS = _urllib_defaults()
# The classes whose methods build_opener() registers by name (dir()), with
# their bases: a method added or removed later changes the registrations.
_REGISTERING = (*{k: None for c in _URLLIB_DEFAULTS[2:] if isinstance(c, type)
                   for k in c.__mro__}, InProcHandler)

# The environment OpenSSL consults when urllib makes its default SSL context.
_TLS_ENVIRON = ("SSL_CERT_FILE", "SSL_CERT_DIR", "OPENSSL_CONF")


class OpenerFactory:
    """Hands out ``OpenerDirector`` objects that reach the apps mounted here.

    Each opener carries its own ``source`` and ``actor``; all of them see
    later ``mount``/``unmount`` calls on the factory.
    """

    def __init__(self, apps: Optional[Mapping[str, Any]] = None, *,
                 intercept_http: bool = False, record: Any = False) -> None:
        self._mounts = _Mounts()
        for name, app in (apps or {}).items():
            self._mounts.add(name, app)
        self.intercept_http = intercept_http
        #: The call journal every opener of this factory adds to, or None.
        self.calls = _journal(record)
        self._tls: Any = None  # urllib's default HTTPSHandler, made on first use
        self._prototype: Any = None  # the opener _copy_opener copies, and its key

    def mount(self, name: str, app: Any, *, server: Any = None,
              fault: Optional[Fault] = None, key: Optional[bytes] = None) -> None:
        """Serve ``app`` as ``name`` on every opener of this factory (see
        ``InProcHandler.mount``)."""
        self._mounts.add(name, app, server, fault, key)

    def unmount(self, name: str) -> None:
        """Stop serving ``name``; ``KeyError`` if nothing is mounted there."""
        self._mounts.remove(name)

    def close(self) -> None:
        """Stop what the factory runs for ASGI apps, for all its openers: see
        ``InProcHandler.close``."""
        self._mounts.close()

    def drain(self, timeout: float) -> int:
        """Drain every opener of this factory: see ``InProcHandler.drain``."""
        return self._mounts.drain(timeout)

    def __enter__(self) -> OpenerFactory:
        return self

    def sharing(self, *, source: Optional[str] = None, actor: Any = None,
                record: Any = False) -> InProcHandler:
        """A handler over this factory's mounts that serves ``http(s)://``
        URLs of mounted hosts (``intercept_http=True``), tagged with
        ``source`` and ``actor``: what ``intercept(factory)`` serves with.
        Its journal is the factory's unless ``record`` asks for another."""
        return InProcHandler(self._mounts, source=source, actor=actor, intercept_http=True,
                             record=record or self.calls)

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def opener_for(self, *handlers: Any, actor: Any = None,
                   source: Optional[str] = None) -> urllib.request.OpenerDirector:
        """A new opener whose in-process requests carry ``actor`` and
        ``source``; ``handlers`` are added as ``build_opener`` adds them.
        Raises ``BridgeError`` when nothing is mounted."""
        if not self._mounts:
            raise BridgeError("nothing is mounted on this OpenerFactory; mount an app first")
        bridge = InProcHandler(self._mounts, source=source, actor=actor,
                               intercept_http=self.intercept_http, record=self.calls)
        if handlers or _URLLIB_DEFAULTS != _urllib_defaults():
            return urllib.request.build_opener(bridge, *self._https_for(handlers), *handlers)
        return self._copy_opener(bridge)

    def _https_for(self, handlers: Tuple[Any, ...]) -> List[Any]:
        """The HTTPS handler build_opener() would add, sharing one SSL context
        across this factory's openers.  Since 3.12 every ``HTTPSHandler()``
        makes its own default context (loading the CA store: ~20 ms on 3.13,
        100 times a request), and a factory makes an opener per call site or
        actor.  The context is the one urllib's own ``HTTPSHandler()`` made,
        so its TLS settings are urllib's on every version; where that is
        ``None`` (before 3.12: one per connection) nothing changes."""
        cls = getattr(urllib.request, "HTTPSHandler", None)  # None without ssl
        if cls is None or any(isinstance(h, cls) or (isinstance(h, type) and issubclass(h, cls))
                              for h in handlers):
            return []  # build_opener adds none either, or the caller brought one
        context = self._tls_context(cls)
        return [] if context is None else [cls(context=context)]

    def _tls_context(self, cls: Any) -> Any:
        # A new context when what OpenSSL reads at its creation changed, as a
        # new build_opener() would see it.
        key = (cls, *(os.environ.get(name) for name in _TLS_ENVIRON))
        if self._tls is None or self._tls[0] != key:
            self._tls = (key, cls())
        return getattr(self._tls[1], "_context", None)

    def _copy_opener(self, bridge: InProcHandler) -> urllib.request.OpenerDirector:
        """``build_opener(bridge)`` with the shared HTTPS handler, made by
        copying a prototype.  build_opener() asks each of its ten handlers for
        its methods with ``dir()``: two thirds of its 0.3 ms on 3.8-3.11,
        where a factory's opener cost as much.  The prototype is built by
        build_opener() itself; each copy gets handlers of its own (a shallow
        copy of each stateless default, a new ``ProxyHandler``, whose methods
        close over it, and ``bridge``) registered as in the prototype.  What
        build_opener() reads afresh for every opener is read afresh here and
        keys the prototype: the environment's proxies and the TLS settings."""
        proxies = urllib.request.getproxies()  # as ProxyHandler() reads them
        cls = getattr(urllib.request, "HTTPSHandler", None)
        context = None if cls is None else self._tls_context(cls)
        key = (tuple(sorted(proxies.items())), context,
               # 3.12+: a new HTTP(S)Handler takes its connection class's
               # debuglevel; and what each class registers, by name.
               http.client.HTTPConnection.debuglevel,
               getattr(getattr(http.client, "HTTPSConnection", None), "debuglevel", None),
               tuple(len(vars(k)) for k in _REGISTERING))
        cached = self._prototype  # read once: another thread may replace it
        if cached is None or cached[0] != key:
            template = InProcHandler(self._mounts)
            https = [] if cls is None or context is None else [cls(context=context)]
            # The prototype's proxies are the ones in its key, not a second
            # reading of the environment.
            cached = self._prototype = (key, template, urllib.request.build_opener(
                template, urllib.request.ProxyHandler(dict(proxies)), *https))
        # OpenerDirector's registries are attributes typeshed leaves out;
        # the tests compare every copy with what build_opener() makes.
        _, template, prototype = cached
        opener: Any = urllib.request.OpenerDirector()
        twin: Dict[Any, Any] = {}
        for handler in prototype.handlers:
            new: Any
            if handler is template:
                new = bridge
            elif type(handler) is urllib.request.ProxyHandler:
                new = urllib.request.ProxyHandler(dict(proxies))
            else:
                new = object.__new__(type(handler))
                new.__dict__.update(handler.__dict__)
            new.add_parent(opener)
            twin[handler] = new

        def chain(handlers: List[Any]) -> List[Any]:
            return [twin[h] for h in handlers]

        opener.handlers = chain(prototype.handlers)
        opener.handle_open = {k: chain(v) for k, v in prototype.handle_open.items()}
        opener.handle_error = {k: {code: chain(v) for code, v in d.items()}
                               for k, d in prototype.handle_error.items()}
        opener.process_request = {k: chain(v) for k, v in prototype.process_request.items()}
        opener.process_response = {k: chain(v) for k, v in prototype.process_response.items()}
        return cast(urllib.request.OpenerDirector, opener)


# ---------------------------------------------------------------------------
# Interception: every urllib opener and http.client connection
# ---------------------------------------------------------------------------
#
# While an intercept() block is active, a few stdlib entry points are
# patched at class level, so that openers built before the block (SDKs keep
# their own) and code written on http.client are reached too:
#
# * HTTPHandler.http_open / HTTPSHandler.https_open: a request for a mounted
#   host is served by the block's bridge, as intercept_http=True serves it;
#   the opener's processors (errors, redirects, cookies) run as for any URL.
# * FTPHandler.ftp_open: with network=False, refused as another host is.
# * HTTPRedirectHandler.redirect_request: a network response may not
#   redirect into a mounted host.
# * urllib.request.proxy_bypass: environment proxies skip mounted hosts.
# * HTTPConnection.connect / HTTPSConnection.connect: a connection to a
#   mounted host gets an in-process socket; each request written to it is
#   served by the bridge and its response rendered back as HTTP/1.1, so
#   several requests share one connection as over TCP.
#
# The patches go in with the first block and out with the last; a block
# only pushes its bridge on a stack (innermost first).  Outside a block
# nothing is patched; inside, a host no block mounts costs a lookup per
# block.

_blocks: Tuple[_Block, ...] = ()  # the active blocks, innermost first
_patched: List[Tuple[Any, str, Any]] = []  # (owner, name, what was there) to put back
_BLOCKS_LOCK = threading.Lock()
_MISSING = object()


class _Block:
    """One active ``intercept()``: its bridge and whether other hosts may
    reach the network."""

    __slots__ = ("bridge", "network")

    def __init__(self, bridge: InProcHandler, network: bool) -> None:
        self.bridge = bridge
        self.network = network


def _route(host: str, scheme: str) -> Tuple[Optional[InProcHandler], bool]:
    """(the bridge that serves ``host``, or None; whether the network may
    be used for it).  Raises ``BridgeError`` for a host no block mounts
    when the innermost block has ``network=False``."""
    blocks = _blocks
    for block in blocks:
        if block.bridge.serves_host(host, scheme):
            return block.bridge, False
    _refuse_offline(host, scheme)
    return None, True


def _refuse_offline(host: str, scheme: str) -> None:
    """``BridgeError`` naming ``host`` when the innermost block has
    ``network=False``: no block serves it, so it would go to the network."""
    blocks = _blocks
    if blocks and not blocks[0].network:
        raise BridgeError("%s://%s is not mounted in this intercept(network=False) block: "
                          "nothing may reach the network" % (scheme, host))


def _origin(host: str, port: Optional[int], scheme: str) -> str:
    shown = "[%s]" % host if ":" in host and not host.startswith("[") else host
    return shown if port is None or port == _DEFAULT_PORTS[scheme] else "%s:%d" % (shown, port)


def _patch(owner: Any, name: str, value: Any) -> None:
    _patched.append((owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, value)


def _install() -> None:
    # With _BLOCKS_LOCK held, for the first block.
    request_module = urllib.request
    for cls, scheme in ((request_module.HTTPHandler, "http"),
                        (getattr(request_module, "HTTPSHandler", None), "https")):
        if cls is None:
            continue
        original = getattr(cls, scheme + "_open")

        def opened(self: Any, req: urllib.request.Request, _original: Any = original) -> Any:
            bridge, _ = _route(req.host, req.type)
            if bridge is not None:
                return bridge.http_open(req)
            return _original(self, req)

        _patch(cls, scheme + "_open", opened)

    # An opener's other way out to a host: ftp:// (CacheFTPHandler inherits
    # it).  Mounts serve http(s) only, so an ftp:// host is never served
    # in-process; network=False refuses it before ftplib connects.  (Through
    # a proxy an ftp:// request is an http one, refused by http_open.)
    ftp_open = request_module.FTPHandler.ftp_open

    def ftp_opened(self: Any, req: urllib.request.Request, _original: Any = ftp_open) -> Any:
        _refuse_offline(req.host, "ftp")
        return _original(self, req)

    _patch(request_module.FTPHandler, "ftp_open", ftp_opened)

    redirect = request_module.HTTPRedirectHandler.redirect_request

    def redirect_request(self: Any, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> Any:
        exchange = fp._exchange if isinstance(fp, _Response) else None
        if exchange is not None and exchange.remote:
            # A remote mount's answer came over the network: not followed.
            raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)
        if exchange is None:
            try:  # judged as urllib will open it: Request() unquotes the host
                probe = urllib.request.Request(newurl)
                served = probe.type in ("http", "https") and _route(
                    probe.host, probe.type)[0] is not None
            except (ValueError, BridgeError):
                served = False  # not ours: the network's rules decide
            if served:
                raise urllib.error.HTTPError(
                    req.full_url, code, "%s - a network response may not redirect into the "
                    "in-process bridge (%s)" % (msg, newurl), headers, fp)
        return redirect(self, req, fp, code, msg, headers, newurl)

    _patch(request_module.HTTPRedirectHandler, "redirect_request", redirect_request)

    bypass = request_module.proxy_bypass

    def proxy_bypass(host: str) -> Any:
        for scheme in ("http", "https"):
            try:
                if _route(host, scheme)[0] is not None:
                    return True
            except BridgeError:
                pass
        return bypass(host)

    _patch(request_module, "proxy_bypass", proxy_bypass)

    for conn_class, scheme in ((http.client.HTTPConnection, "http"),
                               (getattr(http.client, "HTTPSConnection", None), "https")):
        if conn_class is None:
            continue
        connect = vars(conn_class)["connect"]

        def connected(self: Any, _connect: Any = connect, _scheme: str = scheme) -> None:
            origin = _origin(self.host, self.port, _scheme)
            bridge, _ = _route(origin, _scheme)
            if bridge is None:
                _connect(self)
            else:
                self.sock = _InterceptSocket(bridge, _scheme, origin, self.timeout)

        _patch(conn_class, "connect", connected)


def _uninstall() -> None:
    # With _BLOCKS_LOCK held, after the last block.
    while _patched:
        owner, name, before = _patched.pop()
        if before is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


@contextlib.contextmanager
def intercept(apps: Any = None, *, network: bool = True, source: Optional[str] = None,
              actor: Any = None, record: Any = False) -> Iterator[InProcHandler]:
    """While the block runs, the whole process serves the hosts mounted
    here in-process: every ``urllib.request`` opener (the installed one,
    ``urlopen(context=...)``, openers built before or inside the block) and
    ``http.client`` connections (``xmlrpc.client``, code written on
    http.client), with the host matching of ``intercept_http=True``.
    ``apps`` is a mapping (as ``InProcHandler``'s), an ``InProcHandler``
    (its mounts, source and actor) or an ``OpenerFactory`` (its mounts).
    Other hosts go to the network -- or, with ``network=False``, raise
    ``BridgeError`` before any connection (urllib's ``http``, ``https``
    and ``ftp`` URLs, ``http.client`` connections; a raw ``socket`` is
    not watched).  Blocks nest (the innermost one's mounts first); leaving
    one restores what was there before it.
    Yields the ``InProcHandler`` serving the block: its ``mount()`` and
    ``unmount()`` act at once."""
    global _blocks
    if isinstance(apps, InProcHandler):
        bridge = apps.sharing(intercept_http=True, record=record)
    elif isinstance(apps, OpenerFactory):
        bridge = apps.sharing(source=source, actor=actor, record=record)
    elif apps is None or isinstance(apps, Mapping):
        bridge = InProcHandler(apps, source=source, actor=actor, intercept_http=True,
                               record=record)
    else:
        raise TypeError("intercept() wants a mapping of mount names to apps, an InProcHandler "
                        "or an OpenerFactory, not %s" % type(apps).__name__)
    urllib.request.build_opener(bridge)  # its parent, for remote mounts' network()
    block = _Block(bridge, network)
    with _BLOCKS_LOCK:
        if not _blocks:
            _install()
        _blocks = (block, *_blocks)
    try:
        yield bridge
    finally:
        with _BLOCKS_LOCK:
            _blocks = tuple(other for other in _blocks if other is not block)
            if not _blocks:
                _uninstall()
        if isinstance(apps, Mapping) or apps is None:
            bridge.close()


class _RawRequest(urllib.request.Request):
    """A request ``intercept()`` took off an ``http.client`` connection:
    its headers are what the client sent (no ``Connection: close`` added,
    as urllib's own requests get)."""


class _InterceptSocket:
    """What an ``HTTPConnection`` to a mounted host gets as its socket: the
    request it writes is gathered, served by the bridge when http.client
    asks for the response, and the response rendered back as HTTP/1.1 (a
    body without a Content-Length chunked, so the connection stays open)."""

    def __init__(self, bridge: InProcHandler, scheme: str, origin: str,
                 timeout: Any) -> None:
        self._bridge = bridge
        self._scheme = scheme
        self._origin = origin
        self._timeout = timeout
        self._parser = _RawParser(None)
        self._body: List[bytes] = []
        self._raw: List[bytes] = []
        self._answer: Any = None  # what serve_raw() gave for the request under way
        self._inbox: Optional[BodyPipe] = None  # its body, for an app on a worker
        self._abandoned: List[_HeadSlot] = []  # requests closed before their response

    def sendall(self, data: Any) -> None:
        if not any(block.bridge is self._bridge for block in _blocks):
            # The block that made this connection has ended: as a server that
            # went away, the connection is gone (a new one goes where it may).
            raise ConnectionResetError(errno.ECONNRESET, "the intercept() block that served "
                                       "%s has ended" % (self._origin,))
        data = data if type(data) is bytes else memoryview(data).tobytes()
        spans = self._parser.feed(data)
        answer = self._answer
        if isinstance(answer, _HandlerRun):
            answer.send(data)  # a handler class reads it as it comes
        elif isinstance(answer, _HeadSlot):
            for start, end in spans:  # another app reads its body on a worker
                self._inbox.write(data[start:end])  # type: ignore[union-attr]
            if self._parser.state == "done":
                self._inbox.close_writer()  # type: ignore[union-attr]
        elif answer is None:
            self._raw.append(data)
            self._body.extend(data[start:end] for start, end in spans)
            if self._parser.state not in ("head", "done"):
                self._begin()
        # (else answered already -- a 503, a Fault's status: the body is dropped)

    def _begin(self) -> None:
        # The head is in and a body follows: the app starts now, as over TCP.
        # A handler class reads the raw bytes; another app gets the body
        # through a pipe this thread fills, and is served on a worker (the
        # caller's thread is still busy sending), its answer waiting in a slot.
        answer = self._bridge.serve_raw(self._request(), b"".join(self._raw), False)
        if answer is not False:
            self._answer = answer
            return
        inbox = self._inbox = BodyPipe(write_timeout=_effective_timeout(self._timeout))
        req = self._request(iter(functools.partial(inbox.read, _RECEIVE_LIMIT), b""))
        slot = self._answer = _HeadSlot()
        raw = b"".join(self._raw)

        def serve() -> None:
            try:
                answer = self._bridge.serve_raw(req, raw, True)
            except BaseException as exc:  # noqa: BLE001 - the caller's, at getresponse()
                answer = exc
            if slot in self._abandoned and hasattr(answer, "close"):
                answer.close()  # the client left before asking for it
            slot.put(answer)

        ctx = contextvars.copy_context()
        _workers.submit(lambda: ctx.run(serve))
        for part in self._body:
            inbox.write(part)

    def send(self, data: Any) -> int:
        self.sendall(data)
        return len(data)

    def _serve_answer(self) -> Any:
        answer = self._answer
        if answer is None:
            answer = self._bridge.serve_raw(self._request(), b"".join(self._raw), True)
        elif isinstance(answer, _HeadSlot):
            answer = answer.take(None)  # the worker's: a response, or what it raised
            if isinstance(answer, BaseException):
                raise answer
        return answer

    def _request(self, body: Any = None) -> _RawRequest:
        parser = self._parser
        method, _, rest = parser.line.partition(" ")
        target = rest.rpartition(" ")[0] or "/"
        url = target if "://" in target else "%s://%s%s" % (self._scheme, self._origin, target)
        chunked = any(name.lower() == "transfer-encoding" and "chunked" in value.lower()
                      for name, value in parser.fields)
        if body is None:
            whole = b"".join(self._body)
            body = [whole] if chunked else whole or None
        # A chunked body stays one (an app sees no Content-Length, as over TCP).
        req = _RawRequest(url, data=body, method=method)
        for name, value in parser.fields:
            req.add_unredirected_header(name, value)
        req.timeout = self._timeout
        return req

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        # What goes wrong comes from the first read, as off a socket: here
        # http.client is still making its response object, which must not
        # be left half made.
        method = self._parser.line.partition(" ")[0]
        try:
            answer = self._serve_answer()
            if answer is None:
                raise BridgeError("%s is no longer mounted" % (self._origin,))
        except Exception as exc:  # noqa: BLE001 - raised at the read instead
            answer = exc
        self._parser, self._body, self._raw, self._answer = _RawParser(None), [], [], None
        self._inbox = None
        if isinstance(answer, BaseException):
            return io.BufferedReader(_Failing(answer))
        if isinstance(answer, _HandlerRun):
            answer.end_request()
            return _KeepingReader(answer.response_file())
        return _KeepingReader(_Rendered(answer, method))

    def settimeout(self, timeout: Optional[float]) -> None:
        self._timeout = timeout

    def setsockopt(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        # Closed with a request under way (never asked for its response):
        # the app must learn its client went away, as over TCP.
        answer, self._answer = self._answer, None
        if isinstance(answer, _HandlerRun):
            answer.abort()
        elif isinstance(answer, _HeadSlot) and self._inbox is not None:
            self._inbox.close_writer(ConnectionAbortedError(
                errno.ECONNABORTED, "the client closed its connection mid-request"))
            self._abandoned.append(answer)  # its response, once made, is closed
        self._inbox = None


class _KeepingReader(io.BufferedReader):
    """The buffered response file of an intercepted http.client connection.
    A cut (a Fault's, as ``IncompleteRead``) ends the raw stream with an
    error after the bytes before it; ``io.BufferedReader``'s ``read(n)`` and
    ``readinto()`` would drop what they had gathered in that call when the
    raw read raised, so a caller reading in pieces lost the last ones.  This
    one returns them, and raises at the next read: every byte, then the
    error -- never a clean short body.  (A reset or a timeout may still take
    unread bytes with it, as over a socket.)"""

    _held: Optional[BaseException] = None

    def read(self, size: Optional[int] = -1) -> bytes:
        held = self._held
        if held is not None:
            self._held = None  # the raw end raises it again from now on
            raise held
        parts: List[bytes] = []
        got = 0
        whole = size is None or size < 0
        while whole or got < cast(int, size):
            try:
                data = self.read1(-1 if whole else cast(int, size) - got)
            except http.client.IncompleteRead as exc:
                if not parts:
                    raise
                self._held = exc
                break
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)


class _Failing(_ChunkReader):
    """A response file whose first read raises what serving the request
    raised (a timeout, a refused host)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self._error = error

    def _next_chunk(self, want: int) -> Optional[bytes]:
        raise self._error


class _Rendered(_ChunkReader):
    """An in-process response as HTTP/1.1 bytes, for http.client to parse:
    the head, then the body as it streams (chunked when no Content-Length
    says where it ends); a read error stays an error."""

    def __init__(self, resp: http.client.HTTPResponse, method: str) -> None:
        super().__init__()
        self._resp = resp
        headers = [(name, value) for name, value in resp.getheaders()
                   if name.lower() not in ("transfer-encoding", "connection")]
        bodiless = method == "HEAD" or resp.status in (204, 304) or resp.status < 200
        self._chunked = not bodiless and not any(
            name.lower() == "content-length" for name, _ in headers)
        if self._chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        lines = ["HTTP/1.1 %d %s" % (resp.status, resp.reason)]
        lines.extend("%s: %s" % field for field in headers)
        self._head: Optional[bytes] = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._done = bodiless

    def _next_chunk(self, want: int) -> Optional[bytes]:
        head, self._head = self._head, None
        if head is not None:
            return head
        if self._done:
            return None
        data = self._resp.read1(_RECEIVE_LIMIT)
        if not data:
            self._done = True
            return b"0\r\n\r\n" if self._chunked else None
        return b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data

    def close(self) -> None:
        self._resp.close()
        super().close()


# ---------------------------------------------------------------------------
# Test doubles: the call journal and faults
# ---------------------------------------------------------------------------
#
# Both live on the exchange, so they behave the same for every app kind: the
# journal's Call is filled in by the exchange's transitions (head out, body
# bytes, the outcome), and a Fault acts where every body byte passes
# (_Exchange.account) and before the head goes (a delay).  Threads that may
# wait (workers, the caller's own) wait in place; the ASGI adapter awaits.

#: Calls a journal keeps with ``record=True``.
RECORD_LIMIT = 1000

#: Bytes of each body a ``Call`` keeps.
RECORD_BODY_LIMIT = 64 * 1024


class Call:
    """One exchange as the bridge saw it, filled in as it goes.

    ``method``, ``url``, ``mount``, ``request_headers`` (``[(name, value)]``
    as the app received them), ``request_body`` (the first 64 KiB the bridge
    took from the caller's body), ``status``, ``reason`` and
    ``response_headers`` (``None`` until the head is out), ``response_body``
    (the first 64 KiB the app sent the caller), ``outcome`` (``"open"``,
    then one of ``"complete"``, ``"app-error"``, ``"caller-closed"``,
    ``"timeout"``, ``"refused"``, ``"cut"``), ``source``, ``actor``,
    ``started`` (``time.time()``) and ``seconds`` (from open to the outcome,
    ``None`` while open).
    """

    __slots__ = ("method", "url", "mount", "request_headers", "status", "reason",
                 "response_headers", "outcome", "source", "actor", "started", "seconds",
                 "_request", "_response_bytes", "_clock", "_parser", "_sent", "_length")

    def __init__(self, url: str, mount: str, request: _Request, source: Optional[Source],
                 actor: Any) -> None:
        self.method = request.method
        self.url = url
        self.mount = mount
        self.request_headers = list(request.headers)
        self.status: Optional[int] = None
        self.reason: Optional[str] = None
        self.response_headers: Optional[List[Tuple[str, str]]] = None
        self.outcome = "open"
        self.source = source
        self.actor = actor
        self.started = time.time()
        self.seconds: Optional[float] = None
        self._clock = time.monotonic()
        body = request.body
        self._request = bytearray(body[:RECORD_BODY_LIMIT] if type(body) is bytes else b"")
        self._response_bytes = bytearray()
        self._parser: Optional[_RawParser] = None  # a handler class's request, followed
        self._sent = 0  # body bytes the caller was sent
        self._length: Optional[int] = None  # what the head declared

    @property
    def request_body(self) -> bytes:
        """The first 64 KiB of the request body."""
        return bytes(self._request)

    @property
    def response_body(self) -> bytes:
        """The first 64 KiB of the response body."""
        return bytes(self._response_bytes)

    def __repr__(self) -> str:
        return "<Call %s %s -> %s %s>" % (self.method, self.url, self.status, self.outcome)

    # -- filled in by the exchange --------------------------------------------

    def _took(self, data: bytes) -> None:
        room = RECORD_BODY_LIMIT - len(self._request)
        if room > 0 and data:
            self._request += data[:room]

    def _took_raw(self, data: bytes) -> None:
        # What http.client sends a handler class: the request head, then the
        # body, chunked or not.
        if self._parser is None:
            self._parser = _RawParser(None)
        for start, end in self._parser.feed(data):
            self._took(data[start:end])

    def _head(self, head: _Head) -> None:
        self.status, self.reason, headers = head
        self.response_headers = list(headers)
        if self.method == "HEAD" or self.status in (204, 304) or self.status < 200:
            # No body, whatever Content-Length says (a HEAD or 304 answer
            # declares the body a GET would get): all of it is the head.
            self._length = 0
            return
        for name, value in headers:
            if name.lower() == "content-length" and value.strip().isdecimal():
                self._length = int(value)

    @property
    def _whole(self) -> bool:
        # The caller has had all the head declared (a caller that read a
        # Content-Length body to its end never asks the app for more).
        return self._length is not None and self._sent >= self._length

    def _response(self, data: bytes) -> None:
        self._sent += len(data)
        room = RECORD_BODY_LIMIT - len(self._response_bytes)
        if room > 0:
            self._response_bytes += data[:room]

    def _end(self, outcome: str, force: bool = False) -> None:
        with _LOCK:
            if self.outcome != "open" and not force:
                return
            self.outcome = outcome
        self.seconds = time.monotonic() - self._clock


class Calls:
    """A bridge's call journal: the last ``limit`` ``Call`` records, oldest
    first.  ``len()``, indexing, iteration (over a snapshot), ``last``
    (``None`` when empty) and ``clear()``; safe to use from any thread."""

    def __init__(self, limit: int = RECORD_LIMIT) -> None:
        if type(limit) is not int or limit < 1:
            raise ValueError("a call journal keeps at least one call, not %r" % (limit,))
        self.limit = limit
        self._calls: collections.deque[Call] = collections.deque(maxlen=limit)
        self._lock = threading.Lock()
        _journals.add(self)

    def _add(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def after_fork(self) -> None:
        """In a forked child: a thread that held the lock is not here."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._calls)

    def __getitem__(self, index: int) -> Call:
        with self._lock:
            return self._calls[index]

    def __iter__(self) -> Iterator[Call]:
        with self._lock:
            return iter(list(self._calls))

    @property
    def last(self) -> Optional[Call]:
        """The newest call, or ``None``."""
        with self._lock:
            return self._calls[-1] if self._calls else None

    def clear(self) -> None:
        """Forget every call."""
        with self._lock:
            self._calls.clear()

    def __repr__(self) -> str:
        return "<Calls: %d of at most %d>" % (len(self), self.limit)


def _journal(record: Any) -> Optional[Calls]:
    """``record=`` as given to a bridge or factory, as its journal."""
    if isinstance(record, Calls):
        return record
    if record is None or record is False:
        return None
    if record is True:
        return Calls()
    if type(record) is not int:
        raise TypeError("record must be True, False or a number of calls, not %r" % (record,))
    if record < 1:
        raise ValueError("record must keep at least one call, not %r" % (record,))
    return Calls(record)


class Fault:
    """A fault to inject into the exchanges of one mount, whatever the app
    kind: ``mount(name, app, fault=Fault(...))``.

    ``status``: answer with this status and an empty body, without calling
    the app.  ``delay``: the head reaches the caller this many seconds
    late (with ``status``, the answer does); ``chunk_delay``: each body
    chunk does.  After ``cut_after`` body
    bytes the body ends as if the connection dropped (the caller's read
    raises ``http.client.IncompleteRead``); after ``reset_after`` the
    caller's read raises ``ConnectionResetError``; after ``stall_after``
    nothing more arrives (the caller's timeout raises ``socket.timeout``).
    The app's next write then fails as for a caller that left.  ``times``:
    only the first K requests to the mount get the fault.
    """

    __slots__ = ("status", "delay", "chunk_delay", "cut_after", "reset_after", "stall_after",
                 "times")

    def __init__(self, *, status: Optional[int] = None, delay: float = 0.0,
                 chunk_delay: float = 0.0, cut_after: Optional[int] = None,
                 reset_after: Optional[int] = None, stall_after: Optional[int] = None,
                 times: Optional[int] = None) -> None:
        if status is not None and (type(status) is not int or not 100 <= status <= 999):
            raise ValueError("Fault(status=...) wants an HTTP status from 100 to 999, not %r"
                             % (status,))
        for name, value in (("delay", delay), ("chunk_delay", chunk_delay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 <= value < float("inf")):
                raise ValueError("Fault(%s=...) wants seconds >= 0, not %r" % (name, value))
        for name, count in (("cut_after", cut_after), ("reset_after", reset_after),
                            ("stall_after", stall_after), ("times", times)):
            least = 1 if name == "times" else 0
            if count is not None and (type(count) is not int or count < least):
                raise ValueError("Fault(%s=...) wants an int >= %d, not %r" % (name, least, count))
        self.status = status
        self.delay = float(delay)
        self.chunk_delay = float(chunk_delay)
        self.cut_after = cut_after
        self.reset_after = reset_after
        self.stall_after = stall_after
        self.times = times

    def __repr__(self) -> str:
        given = ["%s=%r" % (name, getattr(self, name)) for name in self.__slots__
                 if getattr(self, name) not in (None, 0.0)]
        return "Fault(%s)" % ", ".join(given)


class _FaultRun:
    """One exchange's share of a ``Fault``: the body bytes sent so far."""

    __slots__ = ("fault", "sent", "_limits")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.sent = 0
        self._limits = sorted((limit, action) for limit, action in (
            (fault.cut_after, "cut"), (fault.reset_after, "reset"), (fault.stall_after, "stall"))
            if limit is not None)

    def step(self, size: int) -> Tuple[int, Optional[str]]:
        """Of ``size`` body bytes about to go: how many may, and what then
        happens.  A limit acts when a byte past it is sent: a body of exactly
        N bytes is whole."""
        sent = self.sent
        for limit, action in self._limits:
            if sent + size > limit:
                keep = max(limit - sent, 0)
                self.sent = sent + keep
                return keep, action
        self.sent = sent + size
        return size, None



# ---------------------------------------------------------------------------
# The far side of a remote mount: trusted()
# ---------------------------------------------------------------------------


def trusted(app: Any, key: bytes, max_age: float = 300) -> Any:
    """Wrap a WSGI or ASGI ``app`` for the server it moved to behind a
    remote mount (``mount(name, url, key=key)``): a request whose
    ``Inproc-*`` signature is missing, wrong or older than ``max_age``
    seconds gets ``401`` without reaching the app (an ASGI WebSocket
    handshake too, refused before it is accepted); a good one reaches it
    with ``current_source()``, ``current_actor()``, ``environ["inproc.*"]``
    and the ASGI scope's ``inproc`` extension set as in-process, and without
    the ``Inproc-*`` headers.  Served in-process, it is the app itself."""
    if not isinstance(key, bytes):
        raise TypeError("trusted() wants the key as bytes, not %s" % type(key).__name__)
    if not key:
        # With b"" anyone can compute a valid signature: every request could
        # claim any source and actor (a key read from an unset variable).
        raise ValueError("trusted() wants a non-empty key: with b'' anyone can sign a request")
    if isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or not max_age > 0:
        raise ValueError("trusted(max_age=...) wants seconds > 0, not %r" % (max_age,))
    if not callable(app):
        raise TypeError("trusted() wants a WSGI or ASGI app, not %r" % (app,))
    if not _is_asgi(app):
        return _TrustedWSGI(app, key, max_age)
    if isinstance(app, ASGIApp) and not app.lifespan:
        # The mark stays outside: a bridge must not start a lifespan the
        # app was marked as not speaking.
        return ASGIApp(_TrustedASGI(app, key, max_age), lifespan=False)
    return _TrustedASGI(app, key, max_age)


def _tags(key: bytes, max_age: float, method: str, target: str,
          header: Callable[[str], Optional[str]]) -> Optional[Tuple[Optional[Source], Any]]:
    """The (source, actor) a request was signed with, or None if it was not
    (or too long ago).  The signature is compared in constant time."""
    stamp, signature = header("inproc-time"), header("inproc-signature")
    if stamp is None or signature is None or not (stamp.isascii() and stamp.isdigit()
                                                  and len(stamp) <= 12):
        return None
    source, actor = header("inproc-source"), header("inproc-actor")
    expected = _signature(key, stamp, method, target, source, actor)
    good = hmac.compare_digest(expected.encode("ascii"), signature.encode("latin-1", "replace"))
    age = time.time() - int(stamp)
    if not good or not -max_age <= age <= max_age:
        return None
    return (None if source is None else Source(source)), actor


class _InContext:
    """A WSGI result whose items are made in the request's context, where
    ``current_source()`` is the signed one."""

    def __init__(self, result: Iterable[bytes], ctx: contextvars.Context) -> None:
        self._iterator = iter(result)
        self._result = result
        self._ctx = ctx

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return self._ctx.run(next, self._iterator)

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        if close is not None:
            self._ctx.run(close)


class _TrustedWSGI:
    """``trusted()`` of a WSGI app."""

    def __init__(self, app: Callable[..., Any], key: bytes, max_age: float) -> None:
        self.app, self.key, self.max_age = app, key, max_age

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if "inproc.source" in environ:  # served in-process: the bridge's tags stand
            return self.app(environ, start_response)
        method = environ["REQUEST_METHOD"]
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")  # unquoted
        query = environ.get("QUERY_STRING", "")
        tags = _tags(self.key, self.max_age, method, "%d:%s\n%s" % (len(path), path, query),
                     lambda name: environ.get("HTTP_" + name.upper().replace("-", "_")))
        if tags is None:
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                 ("Content-Length", str(len(_DENIED)))])
            return [_DENIED]
        inner = {k: v for k, v in environ.items() if not k.startswith("HTTP_INPROC_")}
        inner["inproc.source"], inner["inproc.actor"] = tags
        ctx = contextvars.copy_context()
        ctx.run(_exchange.set, _Exchange("trusted", tags[0], tags[1], method))
        result = ctx.run(self.app, inner, start_response)
        return result if isinstance(result, (list, tuple)) else _InContext(result, ctx)


class _TrustedASGI:
    """``trusted()`` of an ASGI app."""

    def __init__(self, app: Callable[..., Any], key: bytes, max_age: float) -> None:
        self.app, self.key, self.max_age = app, key, max_age

    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any],
                       send: Callable[..., Any]) -> None:
        kind = scope.get("type")
        extensions = scope.get("extensions") or {}
        # A WebSocket handshake is a request too: checked as one (a GET).
        if kind not in ("http", "websocket") or "inproc" in extensions:
            await self.app(scope, receive, send)  # lifespan; or served in-process
            return
        fields: Dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            fields.setdefault(bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1"))
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        target = _canonical_target(bytes(raw).decode("latin-1"),
                                   bytes(scope.get("query_string", b"")).decode("latin-1"))
        method = scope.get("method", "GET")
        tags = _tags(self.key, self.max_age, method, target, fields.get)
        if tags is None:
            prefix = ""
            if kind == "websocket":
                if "websocket.http.response" not in extensions:
                    # Closed before it is accepted: the server answers 403.
                    await send({"type": "websocket.close", "code": 1008})
                    return
                prefix = "websocket."  # the denial-response extension: our 401
            await send({"type": prefix + "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain"),
                                    (b"content-length", str(len(_DENIED)).encode())]})
            await send({"type": prefix + "http.response.body", "body": _DENIED})
            return
        inner = dict(scope)
        # Both spellings, as _TrustedWSGI drops both (a WSGI server reads
        # Inproc_Source as HTTP_INPROC_SOURCE): no tag is read off a header.
        inner["headers"] = [(name, value) for name, value in scope.get("headers", ())
                            if not bytes(name).lower().replace(b"_", b"-").startswith(b"inproc-")]
        inner["extensions"] = dict(extensions)
        inner["extensions"]["inproc"] = {"source": tags[0], "actor": tags[1]}
        token = _exchange.set(_Exchange("trusted", tags[0], tags[1], method))
        try:
            await self.app(inner, receive, send)
        finally:
            _exchange.reset(token)


# ---------------------------------------------------------------------------
# Self-test and command line
# ---------------------------------------------------------------------------
#
# ``python -m inproc_bridge`` serves an app of every kind in-process (a handler
# class, a WSGI app on both of its paths, an ASGI 3 app) and checks, with no
# network, what caller and app see: the tests' promises, run on the copy of the
# module that Python imports.  The apps share their routes (_selftest_answer);
# each check is a method of _SelfTestRun named in _SELFTEST_CHECKS (one method
# for a check made on several kinds of app) that compares what it got with what
# it wanted through _expect() and returns details for --verbose.  Every wait
# has a deadline: a broken bridge fails a check, it never hangs the run.

_SELFTEST_WAIT = 5.0  # seconds any one wait of a check gives up after
_SELFTEST_ACTOR = "self-test"  # the tagged opener's; it marks what the apps log on purpose
#: A context variable the caller sets, for the apps to read.
_SELFTEST_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("inproc_bridge_selftest",
                                                                    default="unset")
_ST_HANDLER, _ST_WSGI, _ST_ASGI = "handler", "wsgi", "asgi"  # the apps' mount names
# (label, mount name, timeout) for each of the four paths a request can take.
_SELFTEST_PATHS = [("handler class", _ST_HANDLER, _SELFTEST_WAIT),
                   ("WSGI without a timeout", _ST_WSGI, None),
                   ("WSGI with a timeout", _ST_WSGI, _SELFTEST_WAIT),
                   ("ASGI", _ST_ASGI, _SELFTEST_WAIT)]


class _CheckFailed(Exception):
    """A self-test check got something other than what it wanted."""


def _expect(got: Any, want: Any, what: str) -> None:
    """Fail the check unless ``got == want``; the message names both."""
    if got != want:
        import reprlib

        short = reprlib.Repr()  # a body can be 100 kB: cut it to a readable length
        short.maxstring = short.maxother = 160
        raise _CheckFailed("%s: expected %s, got %s" % (what, short.repr(want), short.repr(got)))


def _eventually(get: Callable[[], Any]) -> Any:
    """``get()``'s first true answer within _SELFTEST_WAIT seconds, else its last."""
    deadline, got = time.monotonic() + _SELFTEST_WAIT, get()
    while not got and time.monotonic() < deadline:
        time.sleep(0.002)
        got = get()
    return got


def _selftest_answer(route: str, body: bytes, **saw: Any) -> Tuple[str, bytes]:
    """``(Content-Type, body)`` on the routes all apps serve: ``/boom`` raises,
    ``/echo`` echoes, any other is JSON of ``saw`` and what the app read out of band."""
    import json

    if route == "/boom":
        raise RuntimeError("self-test: an app error")
    if route == "/echo":
        return "application/octet-stream", body
    source = current_source()
    saw.update(source=source, source_type=type(source).__name__, actor=current_actor(),
               var=_SELFTEST_VAR.get(), thread=threading.get_ident())
    return "application/json", json.dumps(saw, sort_keys=True).encode()


class _SelfTestHandler(http.server.BaseHTTPRequestHandler):
    """The handler class (its ``server`` is the run): ``/slow`` answers nothing;
    ``/stream`` writes 3 events, each once the caller has read the last or left."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        _log.debug("self-test handler: %s", format % args)

    def do_GET(self) -> None:
        run, path = cast("_SelfTestRun", self.server), self.path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/slow":  # the caller's timeout passes first: the bridge must tell the app
            run.saw["handler/slow"] = cancelled().wait(_SELFTEST_WAIT)
            return
        ctype, body = ("text/event-stream", b"") if path == "/stream" else _selftest_answer(
            path, body, method=self.command, path=path, server=type(self.server).__name__)
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        if path != "/stream":  # which has no length: it ends when the handler returns
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        for n in range(3 if path == "/stream" else 0):
            try:
                self.wfile.write(b"data: %d\n\n" % n)
                self.wfile.flush()
            except OSError as exc:
                run.saw["handler/stream"] = (type(exc).__name__, cancelled().is_set())
                return
            # The next event once the caller has read this one, or has left.
            _eventually(lambda: run.saw.pop("read-handler", 0) or cancelled().is_set())

    do_POST = do_GET


class _SelfTestRun:
    """The factory serving the apps, an opener with call-site tags and one
    without, ``saw`` (what apps report and callers read, by key), the WSGI and
    ASGI apps, and the checks."""

    def __init__(self) -> None:
        self.factory, self.lock = OpenerFactory(), threading.Lock()
        self.saw: Dict[str, Any] = {}
        self.mounted: List[str] = []
        self.url(_ST_HANDLER)  # opener_for() wants something mounted
        self.tagged = self.factory.opener_for(actor=_SELFTEST_ACTOR, source=SOURCE_AGENTS)
        self.untagged = self.factory.opener_for()

    def url(self, kind: str, path: str = "/whoami") -> str:
        # Mounted on first use: after the openers were made (they must see
        # later mounts), and in the check that needs it, failing if it fails.
        with self.lock:
            if kind not in self.mounted:  # server: the handler class's self.server
                apps = {_ST_HANDLER: _SelfTestHandler, _ST_WSGI: self.wsgi, _ST_ASGI: self.asgi}
                self.factory.mount(kind, apps[kind], server=self)
                self.mounted.append(kind)
        return "inproc://%s%s" % (kind, path)

    def fetch(self, url: str, data: Optional[bytes] = None, *, ctype: Optional[str] = None,
              timeout: Optional[float] = _SELFTEST_WAIT, opener: Any = None,
              headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes]:
        """``(status, body)``, an ``HTTPError``'s too; the Content-Type checked if given."""
        req = urllib.request.Request(url, data=data, headers=headers or {})
        try:
            with (opener or self.tagged).open(req, timeout=timeout) as resp:
                if ctype is not None:
                    _expect(resp.headers["Content-Type"], ctype, "Content-Type from " + url)
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    def whoami(self, url: str, **kwargs: Any) -> Dict[str, Any]:
        """What the app at ``url`` saw of a GET (see _selftest_answer)."""
        import json

        status, body = self.fetch(url, ctype="application/json", **kwargs)
        _expect(status, 200, "status of GET " + url)
        return cast(Dict[str, Any], json.loads(body))

    # -- the WSGI and the ASGI app ---------------------------------------------

    def wsgi(self, environ: Dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        """The shared routes, and ``/missing``."""
        path = environ["PATH_INFO"]
        if path == "/missing":
            start("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no such thing"]
        ctype, body = _selftest_answer(
            path, environ["wsgi.input"].read(), method=environ["REQUEST_METHOD"], path=path,
            scheme=environ["wsgi.url_scheme"], host=environ.get("HTTP_HOST"),
            app_source=environ.get("inproc.source"), app_actor=environ.get("inproc.actor"))
        start("200 OK", [("Content-Type", ctype)])
        return [body]

    async def asgi(self, scope: Dict[str, Any], receive: Callable[..., Any],
                   send: Callable[..., Any], label: str = _ST_ASGI) -> None:
        """Its lifespan startup puts ``label`` in the state; ``/stream`` sends 3
        events, each once the caller has read the last or left (receive() says)."""
        import asyncio

        if scope["type"] == "lifespan":  # startup; shutdown once the bridge closes
            while (await receive())["type"] == "lifespan.startup":
                scope["state"]["lifespan"] = label
                await send({"type": "lifespan.startup.complete"})
            self.saw["shutdown-" + label] = True
            await send({"type": "lifespan.shutdown.complete"})
            return
        request, more, path = b"", True, scope["path"]
        while more:
            message = await receive()
            request, more = request + message.get("body", b""), message.get("more_body", False)
        tags = scope.get("extensions", {}).get("inproc", {})
        ctype, body = ("text/event-stream", b"") if path == "/stream" else _selftest_answer(
            path, request, method=scope["method"], path=path, app_source=tags.get("source"),
            app_actor=tags.get("actor"), lifespan=scope.get("state", {}).get("lifespan"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype.encode())]})
        # The body is all in: what receive() says next is http.disconnect.
        left = asyncio.ensure_future(receive())
        try:
            for n in range(3 if path == "/stream" else 0):
                await send({"type": "http.response.body", "body": b"data: %d\n\n" % n,
                            "more_body": True})
                # The next event once the caller has read this one, or has left: polled,
                # as a blocking wait would stall the loop that the caller's reads need.
                deadline = time.monotonic() + _SELFTEST_WAIT
                while not (self.saw.pop("read-asgi", 0) or left.done()
                           or time.monotonic() > deadline):
                    await asyncio.sleep(0.001)
            await send({"type": "http.response.body", "body": body})
        except OSError as exc:
            self.saw["asgi/stream"] = (left.done() and left.result()["type"], type(exc).__name__)
        finally:
            left.cancel()

    # -- the checks: each returns details for --verbose ------------------------

    def exchange(self, kind: str, want: Optional[Dict[str, Any]] = None, size: int = 0,
                 timeout: Optional[float] = _SELFTEST_WAIT) -> str:
        # A GET, of which the app saw want (its "thread": the caller's or a
        # worker); a POST echo of size bytes; a 404 from WSGI.
        done = []
        if want:
            saw = self.whoami(self.url(kind, "/whoami?x=1"), timeout=timeout)
            saw["thread"] = "the caller's" if saw["thread"] == threading.get_ident() else "a worker"
            _expect({key: saw.get(key) for key in want}, want, "what the app saw of a GET")
            done.append("GET: the app saw %s" % want)
        if size:
            payload = (bytes(range(256)) * (size // 256 + 1))[:size]
            status, body = self.fetch(self.url(kind, "/echo"), payload, timeout=timeout)
            _expect((status, len(body), body == payload), (200, size, True),
                    "(status, length, the same bytes) of a %d-byte POST echo" % size)
            done.append("POST: %d bytes echoed" % size)
        if kind == _ST_WSGI:
            _expect(self.fetch(self.url(kind, "/missing"), timeout=timeout),
                    (404, b"no such thing"), "(HTTPError code, its body)")
            done.append("404 as HTTPError")
        return "; ".join(done)

    def stream(self, kind: str, leave: bool = False) -> str:
        # To the end, each event before the app may write the next; or (leave)
        # close() after the first, and see what the app's next write did.
        with self.tagged.open(self.url(kind, "/stream"), timeout=_SELFTEST_WAIT) as resp:
            _expect(resp.headers["Content-Type"], "text/event-stream", "Content-Type")
            for n in range(1 if leave else 3):
                _expect(resp.readline() + resp.readline(), b"data: %d\n\n" % n,
                        "event %d, read before the app may write event %d" % (n, n + 1))
                if not leave:
                    self.saw["read-" + kind] = True  # only now may the app write the next
            if not leave:
                _expect(resp.read(), b"", "the body after the last event")
                return "3 events, each read while the app waited to write the next"
        want, what = {
            _ST_HANDLER: (("BrokenPipeError", True), "(what the write raised, cancelled())"),
            _ST_ASGI: (("http.disconnect", "BrokenPipeError"), "(receive(), what send() raised)"),
        }[kind]
        _expect(_eventually(functools.partial(self.saw.get, kind + "/stream")), want,
                what + " as the app saw them once the caller closed after the first event")
        return "close() after the first event; then %s = %s" % (what, want)

    def timeout(self) -> str:
        url, started = self.url(_ST_HANDLER, "/slow"), time.monotonic()
        try:
            self.tagged.open(url, timeout=0.2).close()
        except socket.timeout:
            elapsed = time.monotonic() - started
        else:
            raise _CheckFailed("GET %s with timeout=0.2: expected socket.timeout, got a "
                               "response" % url)
        _expect(_eventually(functools.partial(self.saw.get, "handler/slow")), True,
                "cancelled() set in the app once the caller timed out")
        return "socket.timeout after %.0f ms; the app saw cancelled()" % (elapsed * 1000)

    def lifespan(self) -> str:
        life = InProcHandler({"life": functools.partial(self.asgi, label="life")})  # startup
        try:
            saw = self.whoami("inproc://life/whoami", opener=urllib.request.build_opener(life))
            _expect(saw["lifespan"], "life", "the state the startup set, in the request's scope")
        finally:
            life.close()  # the shutdown runs here
        _expect(_eventually(functools.partial(self.saw.get, "shutdown-life")), True,
                "lifespan.shutdown ran when the bridge closed")
        return "startup state reached the request; close() ran the shutdown"

    def errors(self) -> str:
        records: List[logging.LogRecord] = []

        def take(record: logging.LogRecord) -> bool:  # this check's tracebacks: kept, not shown
            if getattr(record, "inproc_actor", None) != _SELFTEST_ACTOR:
                return True
            records.append(record)
            return False

        _log.addFilter(take)
        try:
            statuses = [self.fetch(self.url(kind, "/boom"), timeout=timeout)[0]
                        for _, kind, timeout in _SELFTEST_PATHS]
            _eventually(lambda: len(records) >= len(_SELFTEST_PATHS))
        finally:
            _log.removeFilter(take)
        _expect(statuses, [500] * len(_SELFTEST_PATHS), "statuses over the paths %s"
                % [label for label, _, _ in _SELFTEST_PATHS])
        _expect(sorted((r.levelname, r.args[0] if isinstance(r.args, tuple) else r.args,
                        getattr(r, "inproc_source", None),
                        type(r.exc_info[1] if r.exc_info else None).__name__) for r in records),
                sorted(("ERROR", kind, SOURCE_AGENTS, "RuntimeError")
                       for _, kind, _ in _SELFTEST_PATHS),
                "(level, app, source, exception) of the records logged on %r" % _log.name)
        return "500, and one ERROR record with the traceback and the source on %r" % _log.name

    def read(self, var: Optional[str]) -> str:
        # The tags given to opener_for(), not headers named like them, and the
        # caller's context variable, set to var if given.
        token = _SELFTEST_VAR.set(var) if var else None
        forged = {"Source": "forged", "Actor": "forged", "Inproc-Source": "forged"}
        try:
            for opener, source, actor in ((self.tagged, SOURCE_AGENTS, _SELFTEST_ACTOR),
                                          (self.untagged, None, None)):
                for label, kind, timeout in _SELFTEST_PATHS:
                    saw = self.whoami(self.url(kind), timeout=timeout, opener=opener,
                                      headers=forged)
                    want = {"source": source, "source_type": type(source).__name__,
                            "actor": actor, "var": var or "unset"}
                    if kind != _ST_HANDLER:  # WSGI's environ and ASGI's scope carry them too
                        want.update(app_source=source, app_actor=actor)
                    _expect({key: saw.get(key) for key in want}, want, "%s, opener_for("
                            "source=%r, actor=%r): what the app read" % (label, source, actor))
        finally:
            if token is not None:
                _SELFTEST_VAR.reset(token)
        return ("current_source()/current_actor(), environ['inproc.*'] and scope['extensions']"
                "['inproc'] as opener_for() gave them, whatever the headers; the ContextVar "
                "as the caller had it: %r" % (var or "unset"))

    def intercept(self, urls: List[str]) -> str:
        # Nothing but the bridge in the opener: no proxies, no network (what
        # the bridge leaves to urllib gets None).
        opener = urllib.request.OpenerDirector()
        opener.add_handler(InProcHandler({"api.internal": self.wsgi}, intercept_http=True))
        for url in urls:
            scheme, host = urllib.parse.urlsplit(url)[:2]
            if host == "api.internal":
                saw = self.whoami(url, opener=opener)
                _expect((saw["scheme"], saw["host"]), (scheme, host),
                        "(wsgi.url_scheme, Host) of GET %s, served in-process" % url)
            else:
                _expect(opener.open(url, timeout=_SELFTEST_WAIT), None,
                        "the response to %s (None: the bridge left it to urllib)" % url)
        return ", ".join(urls)

    def doubles(self) -> str:
        # One Fault and one journal per path: a cut body and a refused
        # request, as the caller and the journal see them.
        apps = {_ST_HANDLER: _SelfTestHandler, _ST_WSGI: self.wsgi, _ST_ASGI: self.asgi}
        for label, kind, timeout in _SELFTEST_PATHS:
            with InProcHandler(record=True) as bridge:
                bridge.mount(kind, apps[kind], server=self, fault=Fault(cut_after=5, times=1))
                opener = urllib.request.build_opener(bridge)
                url = "inproc://%s/whoami" % kind
                with opener.open(url, timeout=timeout) as resp:
                    try:
                        got: Any = resp.read()
                    except http.client.IncompleteRead as exc:
                        got = ("IncompleteRead", exc.partial)
                _expect(got[:1], ("IncompleteRead",), "%s: reading a body cut after 5 bytes"
                        % label)
                _expect(len(got[1]), 5, "%s: bytes delivered before the cut" % label)
                bridge.mount(kind, apps[kind], server=self, fault=Fault(status=503))
                _expect(self.fetch(url, opener=opener, timeout=timeout)[0], 503,
                        "%s: Fault(status=503)" % label)
                calls = bridge.calls
                if calls is None:
                    raise _CheckFailed("record=True gave no journal")
                _expect([(call.method, call.outcome) for call in calls],
                        [("GET", "cut"), ("GET", "refused")], "%s: the journal" % label)
        return "cut_after and status on %d paths, journaled" % len(_SELFTEST_PATHS)

    def drain(self) -> str:
        with InProcHandler({"api": self.wsgi}) as bridge:
            opener = urllib.request.build_opener(bridge)
            _expect(self.fetch("inproc://api/whoami", opener=opener)[0], 200, "before drain()")
            _expect(bridge.drain(_SELFTEST_WAIT), 0, "drain() with nothing in flight")
            _expect(self.fetch("inproc://api/whoami", opener=opener)[0], 503, "after drain()")
        return "0 cancelled, then 503"

    def intercept_all(self) -> str:
        import json

        before = vars(http.client.HTTPConnection).get("connect")
        with intercept({"api.internal": self.wsgi}, network=False, source="self-test"):
            conn = http.client.HTTPConnection("api.internal", timeout=_SELFTEST_WAIT)
            try:
                for n in range(2):  # two requests, one connection
                    conn.request("GET", "/whoami?n=%d" % n)
                    resp = conn.getresponse()
                    saw = json.loads(resp.read())
                    _expect((resp.status, saw["path"], saw["app_source"]),
                            (200, "/whoami", "self-test"), "http.client request %d" % n)
            finally:
                conn.close()
            with urllib.request.urlopen("http://api.internal/whoami",
                                        timeout=_SELFTEST_WAIT) as got:
                _expect(got.status, 200, "urlopen() with its own opener")
            try:
                urllib.request.urlopen("http://elsewhere.invalid/", timeout=_SELFTEST_WAIT)
            except BridgeError as exc:
                _expect("elsewhere.invalid" in str(exc.reason), True, "the refusal names the host")
            else:
                raise _CheckFailed("network=False let http://elsewhere.invalid/ through")
        _expect(vars(http.client.HTTPConnection).get("connect"), before,
                "HTTPConnection.connect after the block")
        return "http.client (keep-alive), urlopen(), network=False; restored"

    def unknown(self) -> str:
        try:
            self.tagged.open("inproc://nowhere/", timeout=_SELFTEST_WAIT).close()
        except BridgeError as exc:
            _expect((isinstance(exc, urllib.error.URLError), "'nowhere'" in str(exc.reason)),
                    (True, True), "(a URLError, naming the mount: %s)" % exc.reason)
            return "BridgeError: %s" % exc.reason
        raise _CheckFailed("GET inproc://nowhere/: expected BridgeError, got a response")

    def concurrency(self) -> str:
        jobs = [(label, kind, timeout, b"%s request %d" % (label.encode(), n))
                for label, kind, timeout in _SELFTEST_PATHS for n in range(6)]
        answers: Dict[int, Any] = {}  # each thread sets only its own

        def one(i: int, kind: str, timeout: Optional[float], payload: bytes) -> None:
            try:
                got: Any = self.fetch(self.url(kind, "/echo"), payload, timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - reported as what the check got
                got = "%s: %s" % (type(exc).__name__, exc)
            answers[i] = "ok" if got == (200, payload) else got

        for i, job in enumerate(jobs):
            threading.Thread(target=one, args=(i, *job[1:]), daemon=True,
                             name="inproc_bridge-selftest-%d" % i).start()
        _eventually(lambda: len(answers) == len(jobs))
        _expect({"%s #%d" % (job[0], i): answers.get(i, "no answer within %s s" % _SELFTEST_WAIT)
                 for i, job in enumerate(jobs) if answers.get(i) != "ok"}, {},
                "requests that did not get their own answer")
        return "%d simultaneous POST echoes over the four paths" % len(jobs)


_Check = Callable[[_SelfTestRun], Optional[str]]
_R, _at = _SelfTestRun, functools.partial  # short names, for the table below

#: The self-test's checks, in the order they run: (what it checks, function).
#: A function takes the run and returns details for --verbose (or None); it
#: fails by raising (_expect raises _CheckFailed naming what it got).
_SELFTEST_CHECKS: List[Tuple[str, _Check]] = [
    ("handler class: GET; server= seen as self.server", _at(_R.exchange, kind=_ST_HANDLER, want={
        "method": "GET", "path": "/whoami?x=1", "server": _R.__name__})),
    ("handler class: POST echo of 16 KiB", _at(_R.exchange, kind=_ST_HANDLER, size=16384)),
    ("handler class: SSE, each event read before the app writes the next",
     _at(_R.stream, kind=_ST_HANDLER)),
    ("handler class: timeout= before the headers: socket.timeout; the app sees cancelled()",
     _R.timeout),
    ("handler class: the caller's close() reaches the app (cancelled(), BrokenPipeError)",
     _at(_R.stream, kind=_ST_HANDLER, leave=True)),
    ("WSGI app, no timeout: runs in the caller's thread; POST; 404 as HTTPError",
     _at(_R.exchange, kind=_ST_WSGI, want={"thread": "the caller's"}, size=3, timeout=None)),
    ("WSGI app, timeout=5: runs on a worker thread; POST",
     _at(_R.exchange, kind=_ST_WSGI, want={"thread": "a worker"}, size=3)),
    ("ASGI app: GET and POST echo",
     _at(_R.exchange, kind=_ST_ASGI, want={"method": "GET", "lifespan": _ST_ASGI}, size=100_000)),
    ("ASGI app: streamed response, each event read before the app sends the next",
     _at(_R.stream, kind=_ST_ASGI)),
    ("ASGI app: lifespan state reaches each request; close() runs the shutdown", _R.lifespan),
    ("ASGI app: http.disconnect after the caller closes; a later send() raises",
     _at(_R.stream, kind=_ST_ASGI, leave=True)),
    ("every app kind: an exception before responding is a 500, logged with the source",
     _R.errors),
    ("OpenerFactory: source and actor reach every app kind, out of band", _at(_R.read, var=None)),
    ("every app kind runs in a copy of the caller's contextvars context",
     _at(_R.read, var="the caller's")),
    ("intercept_http=True: http:// and https:// to a mounted host served in-process",
     _at(_R.intercept, urls=["http://api.internal/whoami"] + (
         ["https://api.internal/whoami"] if hasattr(urllib.request, "HTTPSHandler") else []))),
    ("intercept_http=True: other hosts and ports left to urllib (checked without network)",
     _at(_R.intercept, urls=["http://elsewhere.invalid/", "https://api.internal.evil.invalid/",
                             "http://api.internal:8080/"])),
    ("an unknown mount name raises BridgeError naming it", _R.unknown),
    ("24 concurrent requests over the four paths get their own answers", _R.concurrency),
    ("record= and Fault on every path: a cut body raises, a status refuses; both journaled",
     _R.doubles),
    ("drain(): nothing in flight returns 0 at once, then every request gets 503", _R.drain),
    (("intercept(): http.client and urlopen() reach a mounted host; network=False refuses "
      "the rest; nothing left patched"), _R.intercept_all),
]
del _R, _at

#: How one check went: ``failure`` (a str) is None when it passed; ``details``
#: is what it returned, or the traceback; ``seconds`` how long it took.
_CheckResult = collections.namedtuple("_CheckResult", "name failure details seconds")


def _selftest(report: Optional[Callable[[_CheckResult], None]] = None) -> List[_CheckResult]:
    """Run _SELFTEST_CHECKS in order and return how each went; ``report`` is
    called with each result as soon as it is known."""
    import traceback

    results: List[_CheckResult] = []
    run = _SelfTestRun()
    try:
        for name, check in _SELFTEST_CHECKS:
            started, failure, details = time.perf_counter(), None, ""
            try:
                details = check(run) or ""
            except _CheckFailed as exc:
                failure = str(exc)
            except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
                failure = "expected no exception, got %s: %s" % (type(exc).__name__, exc)
                details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            results.append(_CheckResult(name, failure, details, time.perf_counter() - started))
            if report is not None:
                report(results[-1])
    finally:
        run.factory.close()
    return results


def _selftest_header() -> List[str]:
    """The module's version and file, the Python running it, and a note when
    that file is not the copy this Python finds from outside the current
    directory (the installed one, or PYTHONPATH's)."""
    import importlib.machinery
    import platform
    import sysconfig

    path, build = os.path.abspath(__file__), ""
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        gil_enabled = getattr(sys, "_is_gil_enabled", None)
        build = ", free-threaded build, GIL %s" % (
            "enabled" if gil_enabled is None or gil_enabled() else "disabled")
    lines = ["inproc_bridge %s self-test" % __version__, "module: " + path,
             "python: %s %s%s (%s)" % (platform.python_implementation(),
                                       platform.python_version(), build, sys.executable)]
    try:
        here: Optional[str] = os.path.realpath(os.getcwd())
    except OSError:  # the current directory was removed: nothing can come from it
        here = None
    spec = importlib.machinery.PathFinder.find_spec("inproc_bridge", [
        entry for entry in sys.path if os.path.realpath(entry or os.curdir) != here])
    other = spec.origin if spec is not None else None
    if other is None:
        lines.append("note: not an installed copy: from outside the current directory, "
                     "`import inproc_bridge` finds none")
    elif os.path.realpath(other) != os.path.realpath(path):
        lines.append("note: not the copy that `import inproc_bridge` finds from outside the "
                     "current directory, which is %s (run from another directory to test "
                     "that one)" % other)
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m inproc_bridge``: run the self-test; 0 when every check passes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m inproc_bridge", description=(
        "Self-test of inproc_bridge %s: serves an app of every kind in-process, with no "
        "network access, and prints which module file and Python it tests, a line per check "
        "and 'N passed, M failed'. It exits 0 only if every check passed." % __version__))
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only the final "
                          "line, and failed checks after the header lines")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="also print each check's time and what it saw")
    args = parser.parse_args(argv)
    header, gone = _selftest_header(), False

    def out(*lines: str) -> None:
        nonlocal gone
        try:
            for line in lines if not gone else ():
                print(line, flush=True)
        except BrokenPipeError:
            # The reader went away (``| head -1``): the rest goes to os.devnull, as
            # the Python docs' "Note on SIGPIPE" advise, so that no traceback shows
            # and the run goes on to an exit status that says how the checks went.
            gone = True
            try:
                fileno = sys.stdout.fileno()
            except (AttributeError, OSError, ValueError):
                return  # not a real file: nothing is left to flush at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fileno)  # Python flushes stdout at exit: to devnull now
            finally:
                os.close(devnull)

    def report(result: _CheckResult) -> None:
        nonlocal header
        if args.quiet and result.failure is None:
            return
        out(*header)  # once, before the first line: what a failure is a failure of
        header = []
        timing = "  (%.1f ms)" % (result.seconds * 1000) if args.verbose else ""
        out("%s  %s%s" % ("ok  " if result.failure is None else "FAIL", result.name, timing))
        more = [result.failure] if result.failure is not None else []
        more += result.details.rstrip("\n").splitlines() if args.verbose else []
        out(*("      " + line for line in more))

    if not args.quiet:
        out(*header)
        header = []
    started = time.perf_counter()
    results = _selftest(report)
    failed = sum(1 for result in results if result.failure is not None)
    if args.verbose:
        out("%d checks in %.2f s" % (len(results), time.perf_counter() - started))
    out("%d passed, %d failed" % (len(results) - failed, failed))
    return 1 if failed else 0


def _main_as_imported() -> int:
    """``python -m inproc_bridge`` runs this file as ``__main__``: run the
    checks on the module as code imports it (its logger, its classes and
    state) if that import finds this same file."""
    import importlib

    try:
        module: Any = importlib.import_module("inproc_bridge")
    except ImportError:
        return main()
    same = os.path.realpath(getattr(module, "__file__", "") or "") == os.path.realpath(__file__)
    return int(module.main()) if same else main()


if __name__ == "__main__":
    sys.exit(_main_as_imported())
