"""SSHTransport against the test cluster's real sshd (tests/cluster/up.sh):
127.0.0.1:2222 (and :2223 as a ProxyJump host), key ~/.ssh/hpcsl_test_key for root
and hpcsl, password login for hpcsl. Keyboard-interactive two-factor login is tested
against a FAKE server (paramiko in a thread), since a real 2FA PAM stack cannot run here.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

paramiko = pytest.importorskip("paramiko")

from hpc_serverless.adapters.transport import (  # noqa: E402
    LocalTransport,
    connect,
    ssh_paramiko,
)
from hpc_serverless.adapters.transport.ssh import SSHTransport  # noqa: E402
from hpc_serverless.config.site import site_from_mapping  # noqa: E402
from hpc_serverless.core.errors import (  # noqa: E402
    AuthenticationError,
    ConfigError,
    HostKeyError,
    TransportError,
)
from tests.testcluster import KEY, KNOWN_HOSTS, SSH_CONFIG, drop_ssh  # noqa: E402

HOST, PORT, JUMP_PORT = "127.0.0.1", 2222, 2223
HOST_KEY_PUB = "/etc/ssh/ssh_host_ed25519_key.pub"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


pytestmark = [
    pytest.mark.ssh,
    pytest.mark.cluster,
    pytest.mark.skipif(not _answers(PORT), reason=f"no sshd on {HOST}:{PORT}: run tests/cluster/up.sh"),
    pytest.mark.skipif(not (os.path.exists(KEY) and os.path.exists(KNOWN_HOSTS)),
                       reason=f"test key {KEY} or {KNOWN_HOSTS} missing: run tests/cluster/up.sh"),
]


def root_transport(**kw: object) -> SSHTransport:
    opts: dict[str, object] = {"port": PORT, "username": "root", "key_filename": KEY,
                               "known_hosts": KNOWN_HOSTS}
    opts.update(kw)
    return SSHTransport(HOST, **opts)  # type: ignore[arg-type]


@pytest.fixture
def t():
    tr = root_transport()
    yield tr
    tr.close()


@pytest.fixture
def remote_dir(t: SSHTransport):
    d = f"/tmp/hpcs-ssh-test-{secrets.token_hex(6)}"
    yield d
    t.run(["rm", "-rf", "--", d])


def _server_key_line() -> tuple[str, str]:
    """(type, base64) of the sshd's ed25519 host key."""
    kind, blob = Path(HOST_KEY_PUB).read_text().split()[:2]
    return kind, blob


def _kill_session(tr: SSHTransport) -> None:
    """Drop our connection from the server's side (root kills its sshd processes)."""
    assert drop_ssh(PORT, tr.connection.sock.getsockname()[1]) >= 1, \
        "found no sshd process serving the connection"


# -- commands ------------------------------------------------------------------------------
def test_key_auth_runs_squeue_and_id(t: SSHTransport) -> None:
    assert t.describe() == "root@127.0.0.1:2222"
    r = t.run(["squeue", "-h"])
    assert r.ok, r.describe()
    r = t.run(["id", "-u"])
    assert (r.returncode, r.stdout, r.stderr) == (0, "0\n", "")
    assert t.authenticated_with == ["publickey"]
    for _ in range(5):
        assert t.run(["true"]).ok
    assert t.connections == 1  # one connection, reused for every command
    assert t.counts["id"] == 1 and t.counts["true"] == 5
    r = t.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")


def test_password_auth() -> None:
    with SSHTransport(HOST, port=PORT, username="hpcsl", password="hpcsl-test-pw", known_hosts=KNOWN_HOSTS,
                      allow_agent=False, look_for_keys=False) as tr:
        assert tr.run(["id", "-un"]).stdout == "hpcsl\n"
        assert tr.authenticated_with == ["password"]


def test_wrong_password_is_an_authentication_error() -> None:
    tr = SSHTransport(HOST, port=PORT, username="hpcsl", password="not-the-password", known_hosts=KNOWN_HOSTS,
                      allow_agent=False, look_for_keys=False, interactive_handler=lambda *a: [""])
    with pytest.raises(AuthenticationError, match="refused the login") as info:
        tr.open()
    assert info.value.transient is False
    assert "not-the-password" not in str(info.value)


def test_hostile_argv_reaches_the_command_verbatim(t: SSHTransport) -> None:
    marker = f"/tmp/pwned-{secrets.token_hex(4)}"
    for path in ("/tmp/pwned", marker):
        if os.path.exists(path):
            os.unlink(path)
    hostile = ["with space", "it's", 'say "hi"', "a;b", "$(touch /tmp/pwned)", f"$(touch {marker})",
               "`touch /tmp/pwned`", "new\nline", "*", "~", "$HOME", "back\\slash", "", " lead", "-n",
               "'; touch /tmp/pwned; '", "\t tab", "ünï©ødé"]
    r = t.run(["printf", "%s\\n", *hostile])
    assert r.ok, r.describe()
    assert r.stdout == "".join(f"{h}\n" for h in hostile)
    assert not os.path.exists("/tmp/pwned") and not os.path.exists(marker)


def test_stdin_roundtrip_5mb(t: SSHTransport) -> None:
    line = "the quick brown fox jumps over the lazy dog 0123456789 ünï\n"
    data = line * (5_000_000 // len(line) + 1)
    r = t.run(["cat"], input=data)
    assert r.ok and r.stdout == data
    r = t.run(["wc", "-c"], input="")
    assert r.stdout.strip() == "0"


def test_big_stdout_and_stderr_together_do_not_deadlock(t: SSHTransport) -> None:
    # 12 MB on each stream: more than the channel window, read together or it hangs
    script = "head -c 12000000 /dev/zero | tr '\\0' a; head -c 12000000 /dev/zero | tr '\\0' b >&2"
    r = t.run(["sh", "-c", script], timeout=60)
    assert r.ok
    assert len(r.stdout) == len(r.stderr) == 12_000_000
    assert set(r.stdout) == {"a"} and set(r.stderr) == {"b"}


def test_env(t: SSHTransport) -> None:
    env = {"A": "x y", "B": "it's $(touch /tmp/pwned) `id`", "C": "line1\nline2", "EMPTY": ""}
    r = t.run(["sh", "-c", 'printf "%s|%s|%s|%s" "$A" "$B" "$C" "$EMPTY"'], env=env)
    assert r.stdout == "x y|it's $(touch /tmp/pwned) `id`|line1\nline2|"
    with pytest.raises(ConfigError, match="not an environment variable name"):
        t.run(["true"], env={"A;touch /tmp/pwned": "1"})


def test_missing_command_is_a_transport_error(t: SSHTransport) -> None:
    with pytest.raises(TransportError, match="not found"):
        t.run(["no-such-command-hpcs", "x"])
    with pytest.raises(TransportError, match="not found"):
        t.run(["no-such-command-hpcs"], env={"A": "1"})
    assert t.run(["sh", "-c", "exit 127"]).returncode == 127  # a command's own 127 is just a code


def test_timeout_and_connection_survives(t: SSHTransport) -> None:
    start = time.monotonic()
    with pytest.raises(TransportError, match="did not finish within"):
        t.run(["sleep", "10"], timeout=1)
    assert time.monotonic() - start < 5
    assert t.run(["echo", "still here"]).stdout == "still here\n"
    assert t.connections == 1


def test_concurrent_commands_share_one_connection(t: SSHTransport) -> None:
    results: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = t.run(["sh", "-c", f"sleep 0.2; echo {i}"])
        with lock:
            results.append(r.stdout.strip())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(results, key=int) == [str(i) for i in range(20)]
    assert t.connections == 1


# -- host keys -------------------------------------------------------------------------------
def test_missing_key_file_and_unreachable_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        root_transport(key_filename=str(tmp_path / "no-key")).open()
    with pytest.raises(TransportError, match="cannot connect to 127.0.0.1 port 1"):
        root_transport(port=1).open()


def test_unknown_host_key_is_refused(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    expected = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", HOST_KEY_PUB],
                              capture_output=True, text=True, check=True).stdout.split()[1]
    with pytest.raises(HostKeyError) as info:
        root_transport(known_hosts=str(known)).open()
    msg = str(info.value)
    assert expected.startswith("SHA256:") and expected in msg
    assert "127.0.0.1" in msg and "2222" in msg and "not known" in msg
    assert "ssh-keyscan -p 2222 127.0.0.1" in msg and "trust_unknown_hosts: true" in msg
    assert info.value.transient is False
    assert known.read_text() == ""  # nothing recorded without trust_unknown_hosts


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_changed_host_key_is_refused(tmp_path: Path, kind: str) -> None:
    if kind == "rsa":
        other = paramiko.RSAKey.generate(2048)
        line = f"[127.0.0.1]:2222 ssh-rsa {other.get_base64()}\n"
    else:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
        line = "[127.0.0.1]:2222 " + " ".join((tmp_path / "other.pub").read_text().split()[:2]) + "\n"
    known = tmp_path / "known_hosts"
    known.write_text(line)
    with pytest.raises(HostKeyError, match="HAS CHANGED") as info:
        root_transport(known_hosts=str(known), trust_unknown_hosts=True).open()  # trust never covers a change
    assert "man-in-the-middle" in str(info.value) and "ssh-keygen -R" in str(info.value)
    assert known.read_text() == line


def test_trust_unknown_hosts_records_the_key(tmp_path: Path) -> None:
    known = tmp_path / "new dir" / "known_hosts"
    with root_transport(known_hosts=str(known), trust_unknown_hosts=True) as tr:
        assert tr.run(["true"]).ok
    kind, blob = _server_key_line()
    assert known.read_text() == f"[127.0.0.1]:2222 {kind} {blob}\n"
    with root_transport(known_hosts=str(known)) as tr:  # now known: no trust needed
        assert tr.run(["true"]).ok


def test_hashed_known_hosts_entries_match(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    shutil.copy(KNOWN_HOSTS, known)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert "[127.0.0.1]" not in known.read_text()
    with root_transport(known_hosts=str(known)) as tr:
        assert tr.run(["true"]).ok


# -- ssh config, ProxyJump -------------------------------------------------------------------
def test_ssh_config_alias() -> None:
    with SSHTransport("hpcsl-login", ssh_config=SSH_CONFIG) as tr:
        assert tr.describe() == "root@hpcsl-login:2222"
        assert tr.run(["id", "-u"]).stdout == "0\n"
        assert tr.jump_connections == []


def test_proxyjump() -> None:
    with SSHTransport("hpcsl-via-jump", ssh_config=SSH_CONFIG) as tr:
        assert tr.route == ["root@127.0.0.1:2223", "root@127.0.0.1:2222"]
        assert tr.run(["id", "-u"]).stdout == "0\n"
        (jump,) = tr.jump_connections
        assert jump.is_active() and jump.getpeername()[1] == JUMP_PORT
        # the site's connection runs inside a direct-tcpip channel of the jump connection
        assert isinstance(tr.connection.sock, paramiko.Channel)
        assert tr.connection.sock.get_transport() is jump
    assert not jump.is_active()  # close() closes every hop


def test_proxyjump_chain_of_two_hops(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host chained\n    ProxyJump hpcsl-jump,hpcsl-login\n    Port 2222\n\n"
                      + Path(SSH_CONFIG).read_text().replace("Host hpcsl-login hpcsl-jump hpcsl-via-jump",
                                                             "Host hpcsl-login hpcsl-jump hpcsl-via-jump chained"))
    with SSHTransport("chained", ssh_config=str(config)) as tr:
        assert tr.route == ["root@127.0.0.1:2223", "root@127.0.0.1:2222", "root@127.0.0.1:2222"]
        assert tr.run(["echo", "ok"]).stdout == "ok\n"
        assert len(tr.jump_connections) == 2


def test_explicit_arguments_win_over_ssh_config(tmp_path: Path) -> None:
    with SSHTransport("hpcsl-jump", ssh_config=SSH_CONFIG, port=PORT, username="hpcsl") as tr:
        assert tr.describe() == "hpcsl@hpcsl-jump:2222"
        assert tr.run(["id", "-un"]).stdout == "hpcsl\n"
    with pytest.raises(ConfigError, match="does not exist"):
        SSHTransport("x", ssh_config=str(tmp_path / "missing"))


# -- reconnection ----------------------------------------------------------------------------
def _echo_through(chan: object, data: bytes) -> bytes:
    """Send `data` down a `cat` channel and read it back (the agent's kind of conversation)."""
    got = bytearray()

    def feed() -> None:
        chan.sendall(data)  # type: ignore[attr-defined]
        chan.shutdown_write()  # type: ignore[attr-defined]

    th = threading.Thread(target=feed)
    th.start()
    while chunk := chan.recv(1 << 16):  # type: ignore[attr-defined]
        got.extend(chunk)
    th.join()
    return bytes(got)


def test_reconnect_after_the_connection_is_closed(t: SSHTransport) -> None:
    assert t.run(["true"]).ok
    t.connection.close()  # as if the network dropped it
    assert t.run(["echo", "back"]).stdout == "back\n"
    assert t.connections == 2
    t.connection.close()
    chan = t.open_stream("cat")  # the agent's channel opens on a new connection too
    assert _echo_through(chan, b"hello") == b"hello"
    assert t.connections == 3


def test_reconnect_after_the_sshd_session_is_killed(t: SSHTransport) -> None:
    assert t.run(["true"]).ok
    _kill_session(t)
    assert t.run(["echo", "back"]).stdout == "back\n"
    assert t.connections == 2
    _kill_session(t)
    assert _echo_through(t.open_stream("cat"), b"x" * 10) == b"x" * 10
    assert t.connections == 3


def test_a_stream_carries_megabytes_both_ways_and_ends_when_cut(t: SSHTransport) -> None:
    data = os.urandom(8_000_000)
    assert _echo_through(t.open_stream("cat"), data) == data
    chan = t.open_stream("cat")
    t.connection.close()
    with pytest.raises((OSError, EOFError, paramiko.SSHException)):
        chan.sendall(b"y" * 100_000)
        if not chan.recv(10):
            raise EOFError("the stream ended")


def test_a_drop_during_a_command_is_reported_not_rerun(t: SSHTransport, remote_dir: str) -> None:
    t.run(["mkdir", remote_dir])
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            t.run(["sh", "-c", f"echo x >> {remote_dir}/ran; sleep 30"])
        except TransportError as exc:
            errors.append(exc)

    th = threading.Thread(target=slow)
    th.start()
    time.sleep(1.0)
    _kill_session(t)
    th.join(20)
    assert errors and "may or may not have completed" in str(errors[0])
    assert errors[0].transient
    assert t.run(["cat", f"{remote_dir}/ran"]).stdout == "x\n"  # ran once, not retried


def test_reconnect_gives_up_with_a_transient_error(t: SSHTransport) -> None:
    assert t.run(["true"]).ok
    t._route[-1].port = 1  # nothing listens there: every reconnection fails
    t.max_retries = 2
    t.connection.close()
    start = time.monotonic()
    with pytest.raises(TransportError, match="could not reconnect") as info:
        t.run(["true"])
    assert info.value.transient and 0.4 < time.monotonic() - start < 10


# -- keyboard-interactive (FAKE server) ------------------------------------------------------
class _FakeTwoFactorServer(paramiko.ServerInterface):
    """A FAKE sshd that accepts only keyboard-interactive with a password and a one-time
    code, and answers any command with fixed output. A stand-in for a real 2FA PAM
    stack, which cannot run here."""

    PASSWORD, CODE = "fake-pw", "123456"

    def __init__(self) -> None:
        self.commands: list[str] = []

    def get_allowed_auths(self, username: str) -> str:
        return "keyboard-interactive"

    def check_auth_interactive(self, username: str, submethods: str) -> paramiko.InteractiveQuery:
        return paramiko.InteractiveQuery("Fake 2FA", "A fake server for tests.",
                                         ("Password: ", False), ("Verification code: ", False))

    def check_auth_interactive_response(self, responses: list[str]) -> int:
        ok = list(responses) == [self.PASSWORD, self.CODE]
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.commands.append(command.decode())

        def reply() -> None:
            time.sleep(0.05)  # after paramiko has sent the exec request's success reply
            channel.sendall(b"fake output\n")
            channel.sendall_stderr(b"fake error\n")
            channel.send_exit_status(3)
            channel.close()

        threading.Thread(target=reply, daemon=True).start()
        return True


@pytest.fixture
def fake_2fa(tmp_path: Path):
    """(port, known_hosts path, server) of a fake 2FA sshd on an ephemeral loopback port."""
    host_key = paramiko.RSAKey.generate(2048)  # throwaway
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    known = tmp_path / "fake_known_hosts"
    known.write_text(f"[{HOST}]:{port} ssh-rsa {host_key.get_base64()}\n")
    server = _FakeTwoFactorServer()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            tr = paramiko.Transport(sock)
            tr.add_server_key(host_key)
            tr.start_server(server=server)
            transports.append(tr)

    threading.Thread(target=serve, daemon=True).start()
    yield port, str(known), server
    listener.close()
    for tr in transports:
        tr.close()


def _fake_client(port: int, known: str, tmp_path: Path, **kw: object) -> SSHTransport:
    empty_config = tmp_path / "ssh_config"
    empty_config.write_text("")
    return SSHTransport(HOST, port=port, username="alice", known_hosts=known, ssh_config=str(empty_config),
                        allow_agent=False, look_for_keys=False, **kw)  # type: ignore[arg-type]


def test_keyboard_interactive_two_factor(fake_2fa, tmp_path: Path) -> None:
    port, known, server = fake_2fa
    asked: list[tuple[str, str, list[tuple[str, bool]]]] = []

    def handler(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
        asked.append((title, instructions, prompts))
        return [server.PASSWORD if "Password" in p else server.CODE for p, _ in prompts]

    with _fake_client(port, known, tmp_path, interactive_handler=handler) as tr:
        r = tr.run(["echo", "it's"])
        assert (r.returncode, r.stdout, r.stderr) == (3, "fake output\n", "fake error\n")
        assert tr.authenticated_with == ["keyboard-interactive"]
    assert asked == [("Fake 2FA", "A fake server for tests.", [("Password: ", False), ("Verification code: ", False)])]
    assert server.commands == ["echo 'it'\"'\"'s'"]


def test_keyboard_interactive_fills_the_password_and_asks_for_the_code(fake_2fa, tmp_path: Path) -> None:
    port, known, server = fake_2fa
    asked: list[list[tuple[str, bool]]] = []

    def handler(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
        asked.append(prompts)
        return [server.CODE]

    with _fake_client(port, known, tmp_path, password=server.PASSWORD, interactive_handler=handler) as tr:
        assert tr.run(["true"]).returncode == 3
    assert asked == [[("Verification code: ", False)]]


def test_keyboard_interactive_wrong_code(fake_2fa, tmp_path: Path) -> None:
    port, known, server = fake_2fa
    tr = _fake_client(port, known, tmp_path, interactive_handler=lambda t, i, p: [server.PASSWORD, "000000"])
    with pytest.raises(AuthenticationError, match="keyboard-interactive") as info:
        tr.open()
    assert info.value.transient is False and "000000" not in str(info.value)


def test_keyboard_interactive_handler_errors_and_no_terminal(fake_2fa, tmp_path: Path, monkeypatch) -> None:
    port, known, _ = fake_2fa

    def broken(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
        raise RuntimeError("token device unplugged")

    with pytest.raises(AuthenticationError, match="token device unplugged"):
        _fake_client(port, known, tmp_path, interactive_handler=broken).open()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(AuthenticationError, match="no terminal"):
        _fake_client(port, known, tmp_path).open()  # the default handler asks on the terminal


# -- wiring ----------------------------------------------------------------------------------
def test_connect_picks_the_transport_from_the_site() -> None:
    base = {"name": "s", "scheduler": "slurm", "storage": "/tmp"}
    assert isinstance(connect(site_from_mapping(base)), LocalTransport)
    site = site_from_mapping({**base, "host": HOST, "port": PORT, "username": "hpcsl", "key_filename": KEY})
    tr = connect(site)
    assert isinstance(tr, SSHTransport) and tr.describe() == "hpcsl@127.0.0.1:2222"
    tr = connect(site_from_mapping({**base, "host": "hpcsl-login", "port": 2223}), password="pw")
    assert tr.port == JUMP_PORT and tr._route[-1].password == "pw"


def test_paramiko_is_optional(monkeypatch) -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, hpc_serverless, hpc_serverless.adapters.transport; "
                          "assert 'paramiko' not in sys.modules"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    monkeypatch.setattr(ssh_paramiko, "paramiko", None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'hpc-serverless[ssh]'")):
        SSHTransport(HOST)
