"""uvicorn, made to shut down gracefully and exit 0, to drop stalled connections, and run on a thread
for tests and benchmarks.

On SIGINT or SIGTERM the server stops accepting connections, lets in-flight requests finish for up to
`timeout_graceful_shutdown` seconds (cancelling the rest, which aborts them in the engine), runs the
app's lifespan shutdown (the engine thread ends whatever remains) and returns. Stock uvicorn re-raises
the signal afterwards, which turns a clean shutdown into a killed process; this subclass does not.

Slowloris: uvicorn waits for a request's headers forever (its keep-alive timeout only runs between
requests), so a client could hold any number of connections open by sending nothing, or a header line
now and then. `TimedH11Protocol` closes a connection whose request line and headers have not all
arrived `header_timeout` seconds after it opened, or after its previous response ended. The body has
its own deadline in the ASGI guard (`fastgen_jax.server.guard`). No connection limit is set: uvicorn's
`limit_concurrency` answers 503 to everything, `/health` included, once reached, while idle
connections cost the event loop nothing until they time out.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head (see the module docstring)."""

    header_timeout = DEFAULT_HEADER_TIMEOUT
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._in_request():
            self._arm()  # the first bytes of a new request on a kept-alive connection
        super().data_received(data)
        if self._in_request():
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined request may have started in super(); else the keep-alive timer guards the idle
        if not self._in_request():
            self._disarm()

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()


def protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> type[TimedH11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)` with this header deadline."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": header_timeout})


class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one); raises OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """Serves `app` on a background thread: `with ServerThread(app) as url: ...`."""

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        graceful_timeout: float = 5.0,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    ):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=graceful_timeout,
            http=protocol(header_timeout),
        )
        self.server = Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="uvicorn", daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
