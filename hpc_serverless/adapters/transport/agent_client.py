"""The client's end of the agent protocol: one SSH channel to ``python -m hpc_serverless.agent``.

The agent is started the way a batch script starts: the site's ``setup`` lines, then the
site's ``python`` (or ``python3``), both read by the cluster account's shell. Requests go
out with an id; one reader thread hands replies to whoever waits for them, so many threads
share the channel. A channel that breaks is opened again once and the requests that had
no answer are sent again with the same ids: the agent runs each id once.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from hpc_serverless.adapters.wire import FrameError, encode, exact_reader, read_frame, versions
from hpc_serverless.core.errors import AgentError, HPCServerlessError, TransportError

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.ssh import SSHTransport
    from hpc_serverless.config.site import Site

log = logging.getLogger("hpc_serverless")


class _ChannelLost(Exception):
    """The channel to the agent ended while a request waited for its answer."""


def agent_command(site: Site) -> str:
    """The shell line that starts the agent: setup lines, then the site's python."""
    from hpc_serverless.config.site import shell_word

    python = shell_word(site.python) if "python" in site.model_fields_set else "python3"
    return "\n".join([*site.setup, f"exec {python} -m hpc_serverless.agent"])


class AgentClient:
    """Requests to a site's agent over one channel of `transport`."""

    def __init__(self, transport: SSHTransport, site: Site, *, start_timeout: float = 120.0) -> None:
        self.transport, self.site = transport, site
        self.start_timeout = start_timeout
        self.client_id = secrets.token_hex(6)
        self._ids = itertools.count()
        self._lock = threading.RLock()          # (re)connection
        self._write_lock = threading.Lock()
        self._chan: Any = None
        self._generation = 0
        self._waiting: dict[str, tuple[threading.Event, list[Any]]] = {}
        self.info: dict[str, Any] = {}
        #: channels opened (1 + reopenings) and requests sent (round trips), for tests and benchmarks
        self.channels = 0
        self.requests = 0
        #: a test's hook, run after a request is written and before its answer is read
        self.after_send: Callable[[str], None] | None = None

    # -- connection --------------------------------------------------------------------------
    def connect(self) -> dict[str, Any]:
        """Open the channel (if not open) and shake hands; the agent's hello."""
        with self._lock:
            if self._chan is not None and not self._chan.closed:
                return self.info
            chan = self.transport.open_stream(agent_command(self.site))
            chan.settimeout(self.start_timeout)
            hello = {"op": "hello", "versions": versions(), "site": pickle.dumps(self.site),
                     "client": self.client_id}
            try:
                self._send_parts(chan, encode(hello))
                reply = read_frame(exact_reader(chan.recv))
            except (EOFError, OSError, FrameError) as exc:
                raise self._start_failure(chan, exc) from None
            if not reply.get("ok"):
                chan.close()
                raise self._refusal(reply)
            chan.settimeout(None)
            self._chan, self.info = chan, reply
            self._generation += 1
            self.channels += 1
            threading.Thread(target=self._read_replies, args=(chan, self._generation), daemon=True,
                             name="hpc-serverless-agent").start()
            return reply

    def _python(self) -> str:
        return self.site.python if "python" in self.site.model_fields_set else "python3"

    def _start_failure(self, chan: Any, exc: BaseException) -> HPCServerlessError:
        """Why the agent did not answer its hello, from what it wrote to stderr."""
        deadline = time.monotonic() + 5
        err = bytearray()
        while time.monotonic() < deadline:
            if chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
            elif chan.exit_status_ready():
                while chan.recv_stderr_ready():
                    err.extend(chan.recv_stderr(65536))
                break
            else:
                time.sleep(0.02)
        code = chan.recv_exit_status() if chan.exit_status_ready() else None
        chan.close()
        text = err.decode("utf-8", "replace").strip()
        python, where = self._python(), self.transport.describe()
        source = f" ({self.site.source})" if self.site.source else ""
        if "No module named hpc_serverless" in text or "No module named 'hpc_serverless'" in text:
            from hpc_serverless.version import __version__

            return AgentError(
                f"hpc_serverless is not installed for the site's python {python!r} on {where}: install it "
                f"there with `{python} -m pip install 'hpc-serverless[slurm]=={__version__}'`, or set "
                f"`python` in the site file{source} to an interpreter that has it")
        if code == 127 or "not found" in text or "No such file" in text:
            return AgentError(f"the site's python {python!r} was not found on {where}{source}: {text[-500:]}")
        return AgentError(f"the agent on {where} did not start (`{python} -m hpc_serverless.agent` "
                          f"exited {code}): {text[-1500:] or exc}")

    def _refusal(self, reply: dict[str, Any]) -> HPCServerlessError:
        kind, message = reply.get("kind"), str(reply.get("message", reply))
        where = f"{self.transport.describe()} ({self._python()})"
        if kind == "version":
            from hpc_serverless.version import __version__

            return AgentError(f"client and agent do not match: {message}. Install the same version on "
                              f"both sides (`{self._python()} -m pip install 'hpc-serverless=={__version__}'` "
                              f"on {self.transport.describe()}, with the same Python minor version)")
        if kind == "storage":
            from hpc_serverless.core.errors import StoreError

            return StoreError(message)
        return AgentError(f"the agent on {where} refused: {message}")

    def close(self) -> None:
        with self._lock:
            if self._chan is not None:
                self._chan.close()
                self._chan = None

    @staticmethod
    def _send_parts(chan: Any, parts: list[memoryview]) -> None:
        for part in parts:  # memoryview slices: paramiko packs them without another copy
            for off in range(0, part.nbytes, 1 << 20):
                chan.sendall(part[off:off + (1 << 20)])

    def _read_replies(self, chan: Any, generation: int) -> None:
        read = exact_reader(chan.recv)
        try:
            while True:
                reply = read_frame(read)
                with self._lock:
                    slot = self._waiting.get(reply["id"])
                if slot is not None:
                    slot[1].append(reply)
                    slot[0].set()
        except (EOFError, OSError, FrameError) as exc:
            log.info("the channel to the agent on %s ended: %s", self.transport.describe(), exc)
        finally:
            with self._lock:
                if self._generation == generation:
                    self._chan = None
                for event, box in self._waiting.values():
                    if not box:
                        box.append(_ChannelLost)
                        event.set()

    # -- requests ----------------------------------------------------------------------------
    def call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        """Run `op` on the agent; its value, or the exception it raised there. A channel
        that breaks meanwhile is reopened once and the request sent again (same id)."""
        rid = f"{self.client_id}-{next(self._ids)}"
        parts = encode({"id": rid, "op": op, "args": args})
        for attempt in (1, 2):
            event, box = threading.Event(), list[Any]()
            with self._lock:
                self.connect()
                chan = self._chan
                self._waiting[rid] = (event, box)
            try:
                try:
                    with self._write_lock:
                        self.requests += 1
                        self._send_parts(chan, parts)
                except (OSError, EOFError) as exc:
                    chan.close()
                    box.append(_ChannelLost)
                    log.info("sending to the agent failed: %s", exc)
                if self.after_send is not None and not box:
                    self.after_send(op)
                if not event.wait(timeout):
                    raise TransportError(f"the agent on {self.transport.describe()} did not answer "
                                         f"{op} within {timeout} s")
            finally:
                with self._lock:
                    self._waiting.pop(rid, None)
            reply: Any = box[0]
            if reply is _ChannelLost:
                if attempt == 1:
                    log.info("the channel to the agent dropped during %s; sending it again", op)
                    continue
                raise TransportError(f"the channel to the agent on {self.transport.describe()} dropped "
                                     f"twice during {op}")
            if reply["ok"]:
                return reply["value"]
            raise reply["error"]
        raise AssertionError("unreachable")
