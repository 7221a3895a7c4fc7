"""ASGI middleware that guards every route before the app sees a request.

- `HostGuard`: answer only requests whose `Host` header names this server. Why: without an API
  key, any web page the user visits could otherwise drive the server from the browser, either by
  a cross-site request or by DNS rebinding (a hostile name that resolves to 127.0.0.1; its `Host`
  header still carries the hostile name). Loopback names are always allowed.
- `SecurityHeaders`: a Content-Security-Policy that lets the chat page load only its own files,
  and no framing or MIME sniffing, so a page elsewhere cannot embed it or run script in it.

Both answer refusals in the OpenAI error shape, as every other error of the server.
"""

from __future__ import annotations

from collections.abc import Iterable

from acornlm.serve.errors import APIError

LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def host_name(host_header: str) -> str:
    """The name of a Host header, without port and brackets: "[::1]:8000" -> "::1", "a.b:80" -> "a.b"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def send_error(send, error: APIError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class HostGuard:
    """Refuse (HTTP 421) requests whose Host is not loopback or one of `allowed` ("*" allows any)."""

    def __init__(self, app, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = {name.strip().lower().strip("[]") for name in allowed} | set(LOOPBACK_HOST_NAMES)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            headers = dict(scope.get("headers") or [])
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if name not in self.allowed:
                await send_error(send, APIError(
                    421, f"this server does not answer for the host {name!r}; it answers for "
                    f"{', '.join(sorted(self.allowed))} (start it with --allowed_hosts NAME, or with an API key)",
                    code="host_not_allowed"))
                return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Add SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers") or []) + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)
