"""The joining worker's pure parts: the ``--join`` address and the owner-only cookie file."""

from __future__ import annotations

import os

import pytest

from distexec.cluster.elastic import open_owner_only, parse_master


@pytest.mark.parametrize("spec, expected", [
    ("master:9009", ("master", 9009)),
    ("10.0.0.5:1", ("10.0.0.5", 1)),
    ("[::1]:9009", ("::1", 9009)),
    ("distexec-master.default.svc:65535", ("distexec-master.default.svc", 65535)),
])
def test_join_addresses(spec, expected):
    assert parse_master(spec) == expected


@pytest.mark.parametrize("spec", ["master", ":9009", "master:", "master:0", "master:65536",
                                  "master:http", ""])
def test_malformed_join_addresses_are_refused(spec):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_master(spec)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_an_owner_only_cookie_file_opens(tmp_path, mode):
    path = tmp_path / "cookie"
    path.write_bytes(b"c" * 32 + b"\n")
    path.chmod(mode)
    with open_owner_only(str(path)) as f:
        assert f.readline() == b"c" * 32 + b"\n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o601, 0o610])
def test_a_cookie_file_others_may_access_is_refused(tmp_path, mode):
    path = tmp_path / "cookie"
    path.write_bytes(b"c" * 32 + b"\n")
    path.chmod(mode)
    with pytest.raises(PermissionError, match=f"readable by others \\(permissions {mode:04o}\\)"):
        open_owner_only(str(path))


def test_a_cookie_file_through_a_symlink_is_checked_at_its_target(tmp_path):
    """Kubernetes mounts a Secret's files as symlinks into a ..data directory."""
    target = tmp_path / "data"
    target.write_bytes(b"c" * 32 + b"\n")
    target.chmod(0o644)
    link = tmp_path / "cookie"
    link.symlink_to(target)
    with pytest.raises(PermissionError):
        open_owner_only(str(link))
    target.chmod(0o400)
    with open_owner_only(str(link)) as f:
        assert f.read(4) == b"cccc"


def test_a_cookie_path_that_is_no_file_is_refused(tmp_path):
    os.chmod(tmp_path, 0o700)
    with pytest.raises(OSError):
        open_owner_only(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        open_owner_only(str(tmp_path / "missing"))
