"""SSHManager without ssh: machine specs, merging, parameters and the command lines it builds.

The remote command is checked by splitting it back the way a POSIX shell would
(``shlex.split``); tests/managers/test_ssh.py runs it through a real ``sh`` and a real sshd.
"""

from __future__ import annotations

import shlex
import sys

import pytest

from distexec.cluster.ssh import SSHManager
from distexec.cluster.ssh_commands import (
    bind_hint,
    csh_quote,
    merge_machines,
    parse_machine,
    remote_command,
    remote_environment,
    split_machine,
    ssh_command,
)

pytestmark = pytest.mark.timeout(10)


def params(**overrides) -> dict:
    base = SSHManager(["h"]).default_addprocs_params()
    base.update(dir="/work dir", exename="/usr/bin/python3", exeflags=[])
    base.update(overrides)
    return base


# --------------------------------------------------------------------------------------------
# parse_machine (Julia's testset "SSHManager parse_machine", plus user@ and junk)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("127.0.0.1", ("127.0.0.1", None)),
    ("127.0.0.1:80", ("127.0.0.1", 80)),
    ("[2001:db8::1]", ("2001:db8::1", None)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("127.0.0.1:90", ("127.0.0.1", 90)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ("user@host.example", ("user@host.example", None)),
    ("user@host.example:2222", ("user@host.example", 2222)),
    ("user@[::1]:22", ("user@::1", 22)),
])
def test_parse_machine(spec, expected):
    assert parse_machine(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("127.0.0.1:-1", "invalid port format"),
    ("127.0.0.1:0", "invalid port number"),
    ("127.0.0.1:65536", "invalid port number"),
    ("[2001:db8::1]:443:888", "invalid port format"),
    ("[2001:db8::1", "unterminated"),
    ("[2001:db8::1]:aaa", "invalid port format"),
    ("2001:db8::1", "invalid port format"),   # IPv6 needs brackets
    ("[::1]junk", "invalid machine definition"),
    (":22", "no host"),
    ("user@", "no host"),
])
def test_parse_machine_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_machine(spec)


def test_split_machine_takes_an_optional_bind_address():
    assert split_machine("u@h:2222 10.0.0.5:9000") == ("u@h", 2222, "10.0.0.5:9000")
    assert split_machine("h  [::1]:[9000]") == ("h", None, "[::1]:[9000]")
    assert split_machine("h") == ("h", None, None)
    with pytest.raises(ValueError, match="bind"):
        split_machine("h 10.0.0.5:[9000")
    with pytest.raises(ValueError, match="expected"):
        split_machine("h a b")


def test_a_fixed_bind_port_becomes_a_hint_for_the_additional_workers():
    assert bind_hint("10.0.0.5:9000", "10.0.0.5") == "10.0.0.5:[9000]"
    assert bind_hint("10.0.0.5:[9000]", "10.0.0.5") == "10.0.0.5:[9000]"
    assert bind_hint(None, "10.213.1.2") == "10.213.1.2"
    assert bind_hint(None, "fd00::2") == "[fd00::2]"


# --------------------------------------------------------------------------------------------
# machines
# --------------------------------------------------------------------------------------------
def test_repeated_specs_merge_counts_add_and_auto_replaces():
    assert merge_machines(["a", "a", ("a", 3), "b"]) == {"a": 5, "b": 1}
    assert merge_machines([("a", 2), ("a", "auto")]) == {"a": "auto"}
    assert merge_machines([("a", "auto"), ("a", 2)]) == {"a": 2}  # as Julia: a number replaces auto
    assert merge_machines(["a  10.0.0.1", "a 10.0.0.1"]) == {"a 10.0.0.1": 2}


@pytest.mark.parametrize("machines, error", [
    ("host", TypeError),
    ([("h", 0)], ValueError),
    ([("h", -1)], ValueError),
    ([("h", True)], ValueError),
    ([("h", "many")], ValueError),
    ([("h",)], TypeError),
    ([42], TypeError),
    (["h:99999"], ValueError),
])
def test_bad_machines_are_rejected_when_the_manager_is_made(machines, error):
    with pytest.raises(error):
        SSHManager(machines)


def test_display_and_default_parameters():
    manager = SSHManager([("u@h:22", 4), "g"])
    assert repr(manager) == "SSHManager(machines={'u@h:22': 4, 'g': 1})"
    defaults = manager.default_addprocs_params()
    assert defaults["ssh"] == "ssh" and defaults["sshflags"] == []
    assert defaults["shell"] == "posix" and defaults["max_parallel"] == 10
    assert defaults["tunnel"] is False and defaults["multiplex"] is False
    assert defaults["exename"] == sys.executable and defaults["topology"] == "all_to_all"


# --------------------------------------------------------------------------------------------
# command lines
# --------------------------------------------------------------------------------------------
def test_ssh_command_puts_user_flags_first_so_they_win():
    cmd = ssh_command(params(sshflags=["-F", "cfg", "-o", "ConnectTimeout=3"]), "u@h", 2222, "R")
    assert cmd[:5] == ["ssh", "-F", "cfg", "-o", "ConnectTimeout=3"]
    for option in ("ClearAllForwardings=yes", "BatchMode=yes", "ConnectTimeout=10"):
        assert option in cmd
    assert {"-T", "-a", "-x"} <= set(cmd)
    assert cmd[-4:] == ["-p", "2222", "u@h", "R"]
    assert "-p" not in ssh_command(params(), "h", None, "R")


def test_posix_remote_command_is_one_quoted_sh_login_command():
    env = {"X": "it's \"q\" $HOME `x` ; y", "EMPTY": ""}
    words = shlex.split(remote_command(params(env=env), "10.0.0.5:[9000]"))
    assert words[:3] == ["sh", "-l", "-c"] and len(words) == 4
    inner = words[3]
    steps = inner.split(" && ")
    assert shlex.split(steps[0]) == ["cd", "--", "/work dir"]
    exports = [shlex.split(s)[1] for s in steps if s.startswith("export ")]
    assert f"X={env['X']}" in exports and "EMPTY=" in exports
    assert "PYTHONUNBUFFERED=1" in exports and "DISTEXEC_HOST_WORKERS=1" in exports
    assert shlex.split(steps[-1]) == ["exec", "/usr/bin/python3", "-m", "distexec", "worker",
                                      "--die-with-stdin", "--separate-stderr",
                                      "--bind-to", "10.0.0.5:[9000]"]


def test_without_a_bind_address_the_worker_binds_where_ssh_arrived():
    inner = shlex.split(remote_command(params(), None))[3]
    assert "set -- $SSH_CONNECTION" in inner
    assert inner.endswith('--bind-to "$b"')


def test_exename_and_exeflags_as_words():
    inner = shlex.split(remote_command(params(exename=["/opt/py env/bin/python"],
                                              exeflags="-X dev"), "h"))[3]
    assert shlex.split(inner.split(" && ")[-1])[1:3] == ["/opt/py env/bin/python", "-X dev"]


def test_csh_remote_command_uses_setenv_and_csh_quoting():
    command = remote_command(params(shell="csh", env={"V": "a'b!c"}), None)
    lines = command.split("\n")
    assert lines[0] == "cd '/work dir'"
    assert "setenv V 'a'\\''b'\\!'c'" in lines
    assert lines[-1].startswith("exec '/usr/bin/python3' '-m' 'distexec' 'worker'")
    assert lines[-1].endswith("--bind-to $dx_c[3]")
    assert csh_quote("x\ny") == "'x'\\\n'y'"


def test_invalid_shell_and_env_keys():
    with pytest.raises(ValueError, match="invalid shell"):
        remote_command(params(shell="wincmd"), None)
    for key in ("1X", "A-B", "A B", "", "X=Y"):
        with pytest.raises(ValueError, match="invalid env key"):
            remote_environment(params(env={key: "v"}))
    assert remote_environment(params(env=[("_ok9", 1)]))["_ok9"] == "1"


def test_distexec_variables_are_forwarded_and_env_wins(monkeypatch):
    monkeypatch.setenv("DISTEXEC_WORKER_TIMEOUT", "7")
    monkeypatch.setenv("OTHER_VARIABLE", "x")
    env = remote_environment(params(env={"OMP_NUM_THREADS": "4"}))
    assert env["DISTEXEC_WORKER_TIMEOUT"] == "7" and "OTHER_VARIABLE" not in env
    assert env["OMP_NUM_THREADS"] == "4" and "MKL_NUM_THREADS" not in env


def test_the_worker_is_told_its_hosts_count_and_sets_the_thread_limits_itself(monkeypatch):
    """The host's cores are known only there: the command carries the machine's count."""
    monkeypatch.setenv("DISTEXEC_HOST_WORKERS", "9")  # a stray one is not forwarded
    assert remote_environment(params(), 3)["DISTEXEC_HOST_WORKERS"] == "3"
    assert remote_environment(params(), "auto")["DISTEXEC_HOST_WORKERS"] == "auto"
    inner = shlex.split(remote_command(params(), None, 4))[3]
    assert "export DISTEXEC_HOST_WORKERS=4" in inner.split(" && ")
    assert "OMP_NUM_THREADS" not in inner  # the worker sets it: the login shell's value wins
    assert "DISTEXEC_HOST_WORKERS" not in remote_environment(params(enable_threaded_blas=True))
