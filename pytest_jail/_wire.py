"""Messages between the parent and the jail, on a dedicated pipe (never stdout or stderr).

Each message is a JSON object framed by its length (4 bytes, big-endian), so a report of any size
arrives whole. JSON, never pickle: the jail runs code we do not trust to build objects in pytest.
Nothing from the jail is trusted either: a frame over the size limit is refused before its body
is read, and a message whose kind or fields are not the closed vocabulary below is refused too
(:class:`WireError`), so a jail that writes garbage on the wire fails its own test, not pytest.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

_HEADER = struct.Struct(">I")

#: The largest frame a reader takes: a test body's outcome (its report, coverage data) included.
MAX_FRAME = 64 << 20

_OPTIONAL_INT = (int, type(None))
_OPTIONAL_STR = (str, type(None))
#: Every message kind, and the type of each of its fields.
VOCABULARY: dict[str, dict[str, Any]] = {
    "map": {"pid": int},  # the helper asks for its id map (root mode)
    "init": {"pid": int},  # the helper names the jail's init
    "ready": {},  # init is ready for a test body
    "error": {"step": str, "errno": _OPTIONAL_INT, "detail": str, "path": _OPTIONAL_STR},
    "blocked": {"attempts": list, "dropped": int},  # what the recorder refused
    "exit": {"status": int},  # how the command (or the body) ended: a wait status
    "outcome": {"data": dict},  # what a test body sends back
    "syscalls": {"calls": list},  # what the system call filter refused
}


class WireError(ValueError):
    """The other side broke the protocol: a frame too large, not JSON, or not in the vocabulary."""


def send(fd: int, kind: str, **fields: Any) -> None:
    """Write one message; blocks until the whole frame is in the pipe."""
    body = json.dumps({"kind": kind, **fields}, default=str).encode()
    view = memoryview(_HEADER.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


class Reader:
    """Reassembles frames from chunks read off a non-blocking pipe, and checks each message."""

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buffer += chunk
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > self._limit:
                self._buffer.clear()
                raise WireError(f"a frame of {size} bytes, over the limit of {self._limit}")
            if len(self._buffer) < _HEADER.size + size:
                break
            body = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
            del self._buffer[: _HEADER.size + size]
            messages.append(_checked(body))
        return messages


def _checked(body: bytes) -> dict[str, Any]:
    try:
        message: dict[str, Any] = json.loads(body)
    except ValueError as exc:
        raise WireError(f"a frame that is not JSON ({exc})") from None
    kind = message.get("kind") if isinstance(message, dict) else None
    fields = VOCABULARY.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise WireError(f"a message of unknown kind {kind!r}")
    for name, types in fields.items():
        if name not in message or not isinstance(message[name], types) or isinstance(message[name], bool):
            raise WireError(f"a {kind!r} message whose {name!r} is {message.get(name)!r}")
    return message
