"""The wire between parent and jail: length-framed JSON that survives any chunking."""

from __future__ import annotations

import os

import pytest

from pytest_jail import _wire


def test_frames_survive_byte_by_byte_reads() -> None:
    """A large report split into 1-byte chunks comes out whole and in order."""
    r, w = os.pipe()
    payload = {"text": "x" * 100_000, "nested": [1, {"a": None}]}
    pid = os.fork()
    if pid == 0:
        _wire.send(w, "outcome", data=payload)
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
    assert messages == [{"kind": "outcome", "data": payload}, {"kind": "exit", "status": 0}]


def test_non_json_values_become_text() -> None:
    """A value JSON cannot carry is sent as its str(), never pickled."""
    r, w = os.pipe()
    _wire.send(w, "outcome", data={"obj": object})
    os.close(w)
    (message,) = _wire.Reader().feed(os.read(r, 65536))
    os.close(r)
    assert message["data"]["obj"] == "<class 'object'>"


def test_a_frame_over_the_limit_is_refused_before_it_is_read() -> None:
    """A header announcing 2 GiB is refused at once: nothing of that size is ever allocated."""
    reader = _wire.Reader(limit=1 << 20)
    with pytest.raises(_wire.WireError, match="a frame of 2147483648 bytes, over the limit of 1048576"):
        reader.feed((2**31).to_bytes(4, "big") + b"{")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "a frame that is not JSON"),
        (b'{"kind": "launch-missiles"}', "a message of unknown kind 'launch-missiles'"),
        (b'{"kind": "exit", "status": "0"}', "a 'exit' message whose 'status' is '0'"),
        (b'{"kind": "exit", "status": true}', "a 'exit' message whose 'status' is True"),
        (b"[1, 2]", "a message of unknown kind None"),
    ],
)
def test_only_the_vocabulary_is_read(body: bytes, error: str) -> None:
    """Each message is checked against the closed vocabulary: its kind and its fields' types."""
    with pytest.raises(_wire.WireError, match=error.replace("(", r"\(").replace(")", r"\)")):
        _wire.Reader().feed(len(body).to_bytes(4, "big") + body)
