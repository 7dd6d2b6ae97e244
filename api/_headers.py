"""Security headers on every response of the app: the dashboard's pages and files (``/``,
``/static/...``), the API's JSON and exports, errors included.

One middleware rather than headers per route, so a route added later (or the static mount,
which bypasses the routes) cannot be served without them. Every response holds a customer's
data or the page that shows it: none may be cached (``no-store``), sniffed into another
type, framed, or load anything but the dashboard's own files.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import Message, Receive, Scope, Send

from mailmeta.api._asgi import HttpMiddleware

# The dashboard's own code only: nothing from elsewhere, no inline script, never framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class SecurityHeadersMiddleware(HttpMiddleware):
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value  # replaces a route's own (e.g. a file's caching)
            await send(message)

        await self.app(scope, receive, with_headers)
