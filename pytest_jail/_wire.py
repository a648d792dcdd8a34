"""Messages between the parent and the jail, on a dedicated pipe (never stdout or stderr).

Each message is a JSON object framed by its length (4 bytes, big-endian), so a report of any size
arrives whole. JSON, never pickle: the jail runs code we do not trust to build objects in pytest.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

_HEADER = struct.Struct(">I")


def send(fd: int, kind: str, **fields: Any) -> None:
    """Write one message; blocks until the whole frame is in the pipe."""
    body = json.dumps({"kind": kind, **fields}, default=str).encode()
    view = memoryview(_HEADER.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


class Reader:
    """Reassembles frames from chunks read off a non-blocking pipe."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buffer += chunk
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if len(self._buffer) < _HEADER.size + size:
                break
            body = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
            del self._buffer[: _HEADER.size + size]
            messages.append(json.loads(body))
        return messages
