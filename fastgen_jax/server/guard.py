"""The ASGI guard every connection passes before the routes: API key, request body limits, stalled
peers, and one access-log line per request.

- API key: `Authorization: Bearer <key>`, the scheme name in any case (RFC 9110), the key compared in
  constant time. `/health` and `/ready` are open (load balancers probe without a key). A scope that is
  neither HTTP nor lifespan (a WebSocket) is refused whatever its headers: the API has no such route.
- Body: larger than `max_request_bytes` is a 413 (from Content-Length when given, else while reading);
  a body that has not fully arrived `body_timeout` seconds after its headers is a 408, so a client that
  sends a byte now and then cannot hold a request open.
- Sending: a client that leaves a response unread for `send_timeout` seconds (the socket's buffers
  full) loses its connection; the handler's `finally` then aborts what it still had running.
- Logging: one info line per request, method, path, status, seconds and what the handler noted, with
  everything a client chose escaped (no control characters, so no forged lines) and capped in length.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi.responses import JSONResponse

from fastgen_jax.server.protocol import APIError

log = logging.getLogger("fastgen_jax.server")

OPEN_PATHS = ("/health", "/ready")
MAX_LOGGED_CHARS = 300


class SendTimeoutError(ConnectionError):
    """The client has not read the response for `send_timeout` seconds; its connection is dropped."""


def check_api_key(key: str | None) -> None:
    """Raises ValueError unless `key` can travel in an Authorization header as itself: visible ASCII,
    no spaces (what RFC 6750 allows in a bearer token, give or take)."""
    if key is not None and (not key or not all(33 <= ord(c) <= 126 for c in key)):
        raise ValueError("--api_key must be non-empty printable ASCII without spaces")


def loggable(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """Client-chosen text made safe for a log line: control and non-ASCII characters escaped, capped."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in escaped)
    return escaped if len(escaped) <= limit else f"{escaped[:limit]}...({len(escaped)} chars)"


class HTTPGuard:
    """Pure ASGI middleware (see the module docstring)."""

    def __init__(
        self,
        app,
        api_key: str | None,
        max_request_bytes: int,
        body_timeout: float = 30.0,
        send_timeout: float = 60.0,
    ):
        check_api_key(api_key)
        self.app, self.max_request_bytes = app, max_request_bytes
        self.expected = None if api_key is None else api_key.encode("ascii")
        self.body_timeout, self.send_timeout = body_timeout, send_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await _refuse_non_http(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            try:
                async with asyncio.timeout(self.send_timeout):  # no task per chunk, unlike wait_for
                    await send(message)
            except TimeoutError:
                scope["fastgen.log"] = f"{scope.get('fastgen.log', '')} dropped: client not reading"
                raise SendTimeoutError(f"the client read nothing for {self.send_timeout:g} s") from None

        try:
            await self._serve(scope, receive, send_logged)
        except SendTimeoutError:
            pass  # the server closes the connection; the handler has aborted its requests
        finally:
            log.info(
                "%s %s %d %.3fs %s",
                scope["method"],
                loggable(scope["path"], 100),
                status[0],
                time.perf_counter() - start,
                loggable(scope.get("fastgen.log", "")),
            )

    async def _serve(self, scope, receive, send) -> None:
        error = self._check_headers(scope)
        if not any(k == b"content-type" for k, _ in scope["headers"]):
            # the API speaks JSON only; parse bodies sent without a content type as JSON too
            scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(receive)
            if body is None:
                return  # the client left while sending
            if isinstance(body, APIError):
                error = body
            else:
                receive = _replay(body, receive)
        if error is not None:
            scope["fastgen.log"] = f"error: {error.message}"
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)

    def _check_headers(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            what = "is wrong" if b"authorization" in headers else "is missing"
            return APIError(
                401,
                f"the API key {what}: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body exceeds {self.max_request_bytes} bytes", code="request_too_large"
        )

    async def _read_body(self, receive) -> bytes | APIError | None:
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return APIError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s", code="timeout"
                )
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _refuse_non_http(scope, receive, send) -> None:
    """WebSockets (and any other kind of connection) are closed unanswered; nothing is served on them."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})
        return
    log.warning("refused an ASGI connection of type %s", loggable(str(scope["type"])))


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
