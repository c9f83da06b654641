"""uvicorn's HTTP/1.1 protocols, answering requests their parser refuses in the service's one error shape.

A malformed header that the HTTP parser itself rejects (`Content-Length: abc`, `-5`, 23 digits, `1, 2`,
an empty value, a header name with a space, ...) never reaches the ASGI app, so no middleware or
exception handler sees it: uvicorn answers a plain-text `400 Invalid HTTP request received.` from its
protocol class. These subclasses replace only that answer (`send_400_response`) with
`{"error": {"type": "invalid_request", "message", "field"?}}`, `field` being `content-length` when the
parser's reason names that header. Everything else (parsing, keep-alive, flow control) is uvicorn's.

Why the reason is read from `sys.exc_info()`: uvicorn calls `send_400_response(msg)` from inside its
`except httptools.HttpParserError:` / `except h11.RemoteProtocolError:` block with a fixed message, and
the parser's own reason ("Invalid character in Content-Length", "bad Content-Length") is only in the
exception being handled. Outside such a block the answer is still JSON, without a field.

The connection is closed after the answer, as uvicorn does: the parser cannot resynchronise on it.
These answers are not counted in `rewardserve_requests_total` (no route ran).
"""

from __future__ import annotations

import json
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.errors import error_body

CONTENT_LENGTH = "content-length"
MAX_REASON = 120  # characters of the parser's reason quoted in the message


def parser_error_json() -> bytes:
    """The JSON body for the parser error being handled (see the module docstring)."""
    exc = sys.exc_info()[1]
    # h11 quotes the offending line after a colon ("illegal header line: bytearray(b'...')"): keep the
    # reason, not the client's bytes (an Authorization value, say)
    reason = str(exc).split(": ", 1)[0][:MAX_REASON] if exc is not None else ""
    if CONTENT_LENGTH in reason.lower():
        message = f"{CONTENT_LENGTH}: invalid Content-Length header ({reason}); it must be one decimal number of bytes"
        body = error_body("invalid_request", message, CONTENT_LENGTH)
    else:
        body = error_body("invalid_request", f"invalid HTTP request ({reason or 'rejected by the HTTP parser'})")
    return json.dumps(body).encode()


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the parser's 400 in the JSON error shape."""

    def send_400_response(self, msg: str) -> None:
        body = parser_error_json()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def _httptools_protocol():
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # httptools is optional (uvicorn[standard]); uvicorn's "auto" then uses h11 too
        return None

    class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with the parser's 400 in the JSON error shape."""

        def send_400_response(self, msg: str) -> None:
            body = parser_error_json()
            content = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend([b"content-type: application/json\r\n",
                            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                            b"connection: close\r\n", b"\r\n", body])
            self.transport.write(b"".join(content))
            self.transport.close()

    return JsonErrorHttpToolsProtocol


JsonErrorHttpToolsProtocol = _httptools_protocol()


def http_protocol() -> type:
    """The protocol class uvicorn's `http="auto"` would pick (httptools if installed, else h11), with JSON 400s."""
    return JsonErrorHttpToolsProtocol or JsonErrorH11Protocol
