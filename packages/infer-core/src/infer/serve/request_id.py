"""``x-request-id`` on every response: the client's own id echoed, or a fresh one.

The openai client reads this header into ``response._request_id`` (and shows it in errors), and
proxies use it to tie their logs to the server's. A client's id is echoed only when it is short
printable ASCII (a header value must not carry line breaks or grow without bound); otherwise the
server makes one up, as it does when the client sends none.
"""

from __future__ import annotations

import re
import uuid
from typing import Final, final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HEADER", "RequestId"]

#: The header's name (lower case, as ASGI carries it).
HEADER: Final = b"x-request-id"
#: Longest client id echoed back.
MAX_LENGTH: Final = 128
_PRINTABLE: Final = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_LENGTH)


@final
class RequestId:
    """ASGI middleware adding ``x-request-id`` to every HTTP response, errors and streams included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == HEADER), None)
        request_id = given if given is not None and _PRINTABLE.fullmatch(given) else f"req_{uuid.uuid4().hex}".encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
