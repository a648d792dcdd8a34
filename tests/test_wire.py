"""The wire between parent and jail: length-framed JSON that survives any chunking."""

from __future__ import annotations

import os

from pytest_jail import _wire


def test_frames_survive_byte_by_byte_reads() -> None:
    """A large report split into 1-byte chunks comes out whole and in order."""
    r, w = os.pipe()
    payload = {"text": "x" * 100_000, "nested": [1, {"a": None}]}
    pid = os.fork()
    if pid == 0:
        _wire.send(w, "report", data=payload)
        _wire.send(w, "exit", status=0)
        os._exit(0)
    os.close(w)
    reader = _wire.Reader()
    messages = []
    while chunk := os.read(r, 1 if len(messages) == 0 else 4096):
        for b in (chunk[i : i + 1] for i in range(len(chunk))):
            messages += reader.feed(b)
    os.waitpid(pid, 0)
    os.close(r)
    assert messages == [{"kind": "report", "data": payload}, {"kind": "exit", "status": 0}]


def test_non_json_values_become_text() -> None:
    """A value JSON cannot carry is sent as its str(), never pickled."""
    r, w = os.pipe()
    _wire.send(w, "report", data={"obj": object})
    os.close(w)
    (message,) = _wire.Reader().feed(os.read(r, 65536))
    os.close(r)
    assert message["data"]["obj"] == "<class 'object'>"
