"""Unit tests of JailSpec: parsing, validation and the source named in each error (no privileges)."""

from __future__ import annotations

import os

import pytest

from pytest_jail import Bind
from pytest_jail import JailConfigError
from pytest_jail import JailSpec
from pytest_jail._spec import format_size
from pytest_jail._spec import parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("64M", 64 << 20), ("1G", 1 << 30), ("512k", 512 << 10), (4096, 4096), ("1.5G", 3 << 29), ("10MiB", 10 << 20)],
)
def test_parse_size(text: object, size: int) -> None:
    """Sizes accept k/M/G/T suffixes (powers of 1024) and plain bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-5M", 0, True, "12Q"])
def test_parse_size_refuses(text: object) -> None:
    """Anything that is not a positive size is refused."""
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_round_trips() -> None:
    """The report shows sizes the way users write them."""
    assert [format_size(parse_size(s)) for s in ("64M", "1G", "512k")] == ["64M", "1G", "512k"]
    assert format_size(1000) == "1000"


def test_defaults() -> None:
    """The built-in defaults: host view, no network, hostname 'jail'."""
    spec = JailSpec()
    assert (spec.rootfs, spec.net, spec.hostname, spec.timeout, spec.binds) == (None, "none", "jail", None, ())


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"timeout": -1}, "marker on t: timeout=-1 is not valid; allowed: a positive number"),
        ({"net": "wifi"}, "marker on t: net='wifi' is not a network mode; allowed: 'none', 'host', 'bridge', 'bridge:NAME' (NAME: letters, digits, '-' and '_')"),
        ({"pids": 0}, "marker on t: pids=0 is not valid; allowed: a positive whole number"),
        ({"memory": "lots"}, "marker on t: memory='lots' is not valid; allowed: a size of at least 4M (what a jail itself needs), like 64M or 1G"),
        ({"memory": "10"}, "marker on t: memory='10' is not valid; allowed: a size of at least 4M"),
        ({"memory": "1.5"}, "marker on t: memory='1.5' is not valid; allowed: a size of at least 4M"),
        ({"tmpfs": 0}, "marker on t: tmpfs=0 is not valid; allowed: a positive size like 512k, 64M, 1G or a number of bytes"),
        ({"hostname": "bad name"}, "marker on t: hostname='bad name' is not valid"),
        ({"env": {"A": 1}}, "marker on t: env={'A': 1} is not valid; allowed: a dict of str to str"),
        ({"colour": "red"}, "marker on t: unknown argument 'colour'; allowed: rootfs, net"),
    ],
)
def test_bad_values_name_their_source(changes: dict[str, object], expected: str) -> None:
    """Every bad value is one line: the source, the value, and what is allowed."""
    with pytest.raises(JailConfigError) as info:
        JailSpec().merged("marker on t", changes)
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_rootfs_must_exist(tmp_path: os.PathLike[str]) -> None:
    """A rootfs that does not exist is refused with the path it resolved to."""
    with pytest.raises(JailConfigError, match=r"rootfs='does/not/exist' does not exist .*resolved to /"):
        JailSpec(rootfs="does/not/exist")


@pytest.mark.parametrize("name", ["proc", "dev", "tmp", "sys"])
def test_rootfs_with_symlinked_mountpoint_is_refused(tmp_path: os.PathLike[str], name: str) -> None:
    """A rootfs whose proc/dev/tmp/sys is a symlink could aim a mount at the host: refused."""
    root = os.fspath(tmp_path)
    os.symlink("/" + name, os.path.join(root, name))
    with pytest.raises(JailConfigError, match=f"{name} is a symlink \\(to /{name}\\)"):
        JailSpec(rootfs=root)


def test_binds_parse(tmp_path: os.PathLike[str]) -> None:
    """Binds are SRC:DST[:ro|rw], read-only by default, destination absolute without '..'."""
    src = os.fspath(tmp_path)
    spec = JailSpec(binds=[f"{src}:/data", f"{src}:/out:rw"])
    assert spec.binds == (Bind(src, "/data", False), Bind(src, "/out", True))
    for bad in (f"{src}:data", f"{src}:/a/../b", f"{src}:/x:rx", "/does/not/exist:/x"):
        with pytest.raises(JailConfigError):
            JailSpec(binds=[bad])
    with pytest.raises(JailConfigError, match="a list of"):
        JailSpec(binds=f"{src}:/data")  # type: ignore[arg-type]


def test_merged_layers_in_order() -> None:
    """Later layers win: ini, then CLI, then marker."""
    spec = JailSpec().merged("ini", {"timeout": "5"}).merged("cli", {"net": "host"}).merged("marker", {"timeout": 2})
    assert (spec.timeout, spec.net) == (2.0, "host")


def test_spec_is_frozen_and_hashable() -> None:
    """Specs are immutable values."""
    spec = JailSpec(env={"A": "1"})
    with pytest.raises(AttributeError):
        spec.net = "host"  # type: ignore[misc]
    assert spec.limits == {}
    assert JailSpec(pids=5, memory="8M").limits == {"memory": 8 << 20, "pids": 5}


def test_io_limits() -> None:
    """io takes read and/or write bytes per second; anything else is refused in one line."""
    assert JailSpec(io={"write": "10M"}).io == {"write": 10 << 20}
    assert JailSpec(io={"read": 1000, "write": "1k"}).limits == {"io": {"read": 1000, "write": 1024}}
    assert JailSpec(io="read=1M, write=2M").io == {"read": 1 << 20, "write": 2 << 20}
    for bad in ({}, {"speed": "1M"}, "10M", {"read": "fast"}, "speed=1M"):
        with pytest.raises(JailConfigError, match="io=.* is not valid; allowed: "):
            JailSpec(io=bad)  # type: ignore[arg-type]
