"""Environments for Programs' `dependencies` and tasks' `pip`: built once per requirement
set on the site, on the login node (or by the agent there), before a job is queued.

Layout, in ``<storage>/envs/``::

    <key>                  symlink -> <key>-<random>: the published environment
    <key>-<random>/        a venv over the site's python
        lib/python3.X/site-packages/_hpc_serverless_site.pth   the site python's packages
        hpc-serverless-env.json   what it holds (written last: a complete environment)
        install.log               the installer's output
        last-used                 when a job or task last asked for it (gc reads it)
    .failed/<key>.log      the installer's output of the last failed build

The key hashes the normalized requirements (core/requirements.py), the site python's path
and version, and its platform. The venv is made by the site python with ``--without-pip``
and a ``.pth`` file that adds the site python's site-packages (``site.addsitedir``, so its
own ``.pth`` files, e.g. an editable install, count too): qiskit and hpc_serverless are
not installed again, and a venv's python sees them even when the site python is itself a
venv. The installer (pip from those packages, or uv) puts what is missing in the venv.

Two clients building one set at once both build, each in its own ``<key>-<random>``; the
first to create the symlink (atomic, exclusive) publishes, the other removes its copy and
uses the winner's. A venv's scripts hold their path, so a built directory never moves:
jobs run ``envs/<key>/bin/python``, which stays valid whichever copy won.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from hpc_serverless.config.site import EnvironmentSettings, expand
from hpc_serverless.core.errors import EnvironmentBuildError
from hpc_serverless.core.fs import LOCAL
from hpc_serverless.core.private import CheckedDirs, make_private
from hpc_serverless.core.requirements import normalize_requirements

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["Environment", "Environments", "collect_environments", "list_environments"]

META = "hpc-serverless-env.json"
LAST_USED = "last-used"
PTH = "_hpc_serverless_site.pth"
#: a build directory without a link to it is someone's build in progress until this old
_ORPHAN_AFTER_S = 6 * 3600
#: ask a site python for what the key and the .pth need
_FACTS = ("import json, site, sys, sysconfig, importlib.util as u; "
          "paths = [p for p in site.getsitepackages() + [sysconfig.get_paths()['purelib'], "
          "sysconfig.get_paths()['platlib']]]; "
          "print(json.dumps({'version': '.'.join(map(str, sys.version_info[:3])), "
          "'implementation': sys.implementation.cache_tag, 'platform': sysconfig.get_platform(), "
          "'site_packages': list(dict.fromkeys(paths)), 'pip': u.find_spec('pip') is not None}))")


@dataclass(frozen=True)
class Environment:
    """A published environment: its key, directory (the symlink) and python; how it came."""

    key: str
    path: str
    requirements: tuple[str, ...]
    built_s: float | None  # seconds it took to build here; None: reused

    @property
    def python(self) -> str:
        return os.path.join(self.path, "bin", "python")

    def note(self) -> str:
        """The job log's line: 'environment <key>: reused' or '... built in N s'."""
        how = "reused" if self.built_s is None else f"built in {self.built_s:.1f} s"
        return f"environment {self.key}: {how} ({', '.join(self.requirements)})"


class Environments:
    """The environments of one site (or of this machine, for the local provider)."""

    def __init__(self, root: str, python: str, settings: EnvironmentSettings | None = None, *,
                 setup: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.python = python
        self.settings = settings or EnvironmentSettings()
        #: the site's setup lines and variables: its python may need them (`module load`)
        self.setup = tuple(setup)
        self.env = dict(env or {})
        self._facts: dict[str, Any] | None = None
        self._known: dict[tuple[str, ...], Environment] = {}
        self._touched: dict[str, float] = {}
        self._checked = CheckedDirs()
        self._lock = threading.Lock()

    # -- facts and keys -------------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        """The site python's version, platform and site-packages (asked once)."""
        if self._facts is None:
            try:
                out = subprocess.run(self._argv([self.python, "-c", _FACTS]), capture_output=True, text=True,
                                     timeout=120, stdin=subprocess.DEVNULL, env=self._environ())
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise EnvironmentBuildError(f"cannot run the site's python {self.python!r} to build an "
                                            f"environment: {exc}") from None
            if out.returncode != 0:
                raise EnvironmentBuildError(f"the site's python {self.python!r} failed to describe itself: "
                                            f"{out.stderr.strip()[-500:]}")
            self._facts = json.loads(out.stdout.strip().splitlines()[-1])
        return self._facts

    def key(self, requirements: tuple[str, ...]) -> str:
        f = self.facts()
        text = json.dumps({"requirements": list(requirements), "python": self.python, "version": f["version"],
                           "implementation": f["implementation"], "platform": f["platform"]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- use ------------------------------------------------------------------------------------
    def ensure(self, requirements: Sequence[str]) -> Environment:
        """The environment of this requirement set: reused if published, else built now
        (raises EnvironmentBuildError quoting the installer when it cannot be)."""
        reqs = normalize_requirements(list(requirements))
        if not reqs:
            raise ValueError("ensure() needs at least one requirement")
        with self._lock:  # one build per set in this process; others wait and reuse it
            known = self._known.get(reqs)
            if known is not None and os.path.exists(os.path.join(known.path, META)):
                self._check(known.path)
                self._touch(known.key)
                return known
            env = self._reuse_or_build(reqs)
            self._known[reqs] = replace(env, built_s=None)  # the next use here reuses it
            return env

    def _reuse_or_build(self, reqs: tuple[str, ...]) -> Environment:
        key = self.key(reqs)
        link = os.path.join(self.root, key)
        for _ in range(3):
            if os.path.exists(os.path.join(link, META)):
                self._check(link)
                self._touch(key, force=True)
                return Environment(key, link, reqs, None)
            if os.path.islink(link):  # dangling or half-collected: take it away, build anew
                try:
                    os.unlink(link)
                except FileNotFoundError:
                    pass
            env = self._build(key, reqs)
            if env is not None:
                return env
        raise EnvironmentBuildError(f"environment {key}: published and removed again while it was being "
                                    "built (is `gc` running with --older-than 0?); try again")

    def _check(self, link: str) -> None:
        """Refuse an environment others could have changed (UnsafeStoreError): the chain from
        the storage to `envs/` and the build directory its link names, re-checked each second."""
        self._checked.check(os.path.dirname(self.root), self.root)
        # (the link's own target, a name beside it: realpath would also resolve a symlinked
        # storage above, e.g. $SCRATCH, and the build directory would seem to be outside it)
        self._checked.check(self.root, os.path.join(self.root, os.readlink(link)))

    def _touch(self, key: str, *, force: bool = False) -> None:
        """Mark use (at most once a minute per process): gc takes environments unused for long."""
        now = time.time()
        if not force and now - self._touched.get(key, 0.0) < 60:
            return
        self._touched[key] = now
        try:
            LOCAL.write_atomic(os.path.join(self.root, key, LAST_USED), repr(now).encode(), durable=False)
        except OSError:
            pass

    # -- build ----------------------------------------------------------------------------------
    def _build(self, key: str, reqs: tuple[str, ...]) -> Environment | None:
        """Build aside and publish; the winner's Environment, or None if the published one
        vanished before it could be used (the caller tries again)."""
        # environments hold code every job of the user runs: private from the storage down
        make_private(os.path.dirname(self.root), self.root)
        name = f"{key}-{secrets.token_hex(4)}"
        build = os.path.join(self.root, name)
        started = time.monotonic()
        try:
            facts = self.facts()
            installer = self._installer()
            with_pip = installer == "pip" and not facts["pip"]
            self._run([self.python, "-m", "venv", *([] if with_pip else ["--without-pip"]), build],
                      build, "making the venv")
            site_packages = _site_packages(build)
            pth = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in facts["site_packages"])
            LOCAL.write_atomic(os.path.join(site_packages, PTH), (pth + "\n").encode())
            self._run(self._install_argv(installer, os.path.join(build, "bin", "python"), reqs), build,
                      f"installing {', '.join(reqs)} with {installer}")
            seconds = time.monotonic() - started
            meta = {"key": key, "requirements": list(reqs), "python": self.python, "facts": facts,
                    "installer": installer, "built": time.time(), "seconds": seconds, "host": os.uname().nodename}
            LOCAL.write_atomic(os.path.join(build, META), json.dumps(meta, indent=1).encode())
            LOCAL.write_atomic(os.path.join(build, LAST_USED), repr(time.time()).encode(), durable=False)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        link = os.path.join(self.root, key)
        try:
            os.symlink(name, link)  # exclusive: the first client to get here publishes
        except FileExistsError:
            shutil.rmtree(build, ignore_errors=True)
            if os.path.exists(os.path.join(link, META)):
                return Environment(key, link, reqs, None)
            return None
        return Environment(key, link, reqs, seconds)

    def _installer(self) -> str:
        choice = self.settings.installer
        if choice == "uv" and shutil.which("uv") is None:
            raise EnvironmentBuildError("the site's environments.installer is 'uv', but no `uv` is on the login "
                                        "node's PATH; install it or set installer: pip (or auto)")
        if choice == "auto":
            return "uv" if shutil.which("uv") else "pip"
        return choice

    def _install_argv(self, installer: str, python: str, reqs: tuple[str, ...]) -> list[str]:
        s = self.settings
        opts: list[str] = []
        if s.offline:  # find_links only (uv: and no network at all)
            opts += ["--no-index", *(["--offline"] if installer == "uv" else [])]
        if s.index_url and not s.offline:
            opts += ["--index-url", expand(s.index_url)]
        for url in s.extra_index_url:
            opts += ["--extra-index-url", expand(url)]
        for link in s.find_links:
            opts += ["--find-links", expand(link)]
        if installer == "uv":
            return ["uv", "pip", "install", "--python", python, *opts, *reqs]
        return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                "--no-warn-script-location", *opts, *reqs]

    def _argv(self, argv: list[str]) -> list[str]:
        """argv as the site runs it: after its setup lines, as a job's script does."""
        if not self.setup:
            return argv
        return ["bash", "-c", "\n".join([*self.setup, "exec " + shlex.join(argv)])]

    def _environ(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "PIP_NO_INPUT": "1", "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONHOME", None)
        return env

    def _run(self, argv: list[str], build: str, what: str) -> None:
        """Run one build step with its output in the build's install.log; a failure raises
        with the installer's error lines and keeps the log in .failed/."""
        log_path = os.path.join(build, "install.log")
        os.makedirs(build, mode=0o700, exist_ok=True)  # (its parent, envs/, is private already)
        with open(log_path, "ab", opener=lambda path, flags: os.open(path, flags, 0o600)) as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            try:
                code = subprocess.run(self._argv(argv), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self._environ(), umask=0o077,
                                      timeout=self.settings.timeout).returncode
            except subprocess.TimeoutExpired:
                code = None
            except OSError as exc:
                raise EnvironmentBuildError(f"{what}: cannot run {argv[0]!r}: {exc}") from None
        if code == 0:
            return
        with open(log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        kept = os.path.join(self.root, ".failed", os.path.basename(build).rsplit("-", 1)[0] + ".log")
        try:
            LOCAL.makedirs(os.path.dirname(kept), 0o700)
            LOCAL.write_atomic(kept, text.encode(), durable=False)
        except OSError:
            kept = "(not kept: " + os.path.dirname(kept) + " is not writable)"
        why = (f"took longer than environments.timeout ({self.settings.timeout:.0f} s)" if code is None
               else f"failed (exit code {code})")
        error = EnvironmentBuildError(f"{what} {why}; the installer said:\n" + _error_lines(text)
                                      + f"\n(its whole output: {kept})")
        error.output = text
        raise error


def _site_packages(venv: str) -> str:
    lib = os.path.join(venv, "lib")
    for name in sorted(os.listdir(lib)):
        candidate = os.path.join(lib, name, "site-packages")
        if name.startswith("python") and os.path.isdir(candidate):
            return candidate
    raise EnvironmentBuildError(f"the new venv {venv} has no lib/python*/site-packages")


def _error_lines(text: str, most: int = 12) -> str:
    """The installer's own error, from its first error line (pip: 'ERROR: ...'; uv:
    'error: ...' and the causes under it), else its last lines; indented, for a message."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    first = next((i for i, ln in enumerate(lines) if ln.lstrip().lower().startswith(("error", "×"))), None)
    picked = lines[first:first + most] if first is not None else lines[-most:]
    return "\n".join("    " + ln for ln in picked)


# -- gc and du --------------------------------------------------------------------------------------
def collect_environments(root: str, older_than: float, in_use: Iterable[str], *, dry_run: bool = False,
                         now: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Remove (or list) environments unused for `older_than` seconds and not in `in_use`
    (keys of live sessions' and unfinished programs' environments); also build directories
    that no link names (failed or lost builds) once they are old. (removed, kept)."""
    from hpc_serverless.core.sessions import tree_usage

    now = time.time() if now is None else now
    busy = set(in_use)
    removed: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return removed, kept
    linked = {os.readlink(os.path.join(root, n)) for n in names if os.path.islink(os.path.join(root, n))}
    for name in names:
        path = os.path.join(root, name)
        if os.path.islink(path):
            target = os.path.join(root, os.readlink(path))
            last = _last_used(target)
            if name in busy:
                kept.append({"id": name, "path": path, "why": "used by a live session or an unfinished program"})
            elif last is not None and now - last < older_than:
                kept.append({"id": name, "path": path, "why": f"used {now - last:.0f} s ago"})
            else:
                size, files = tree_usage(target)
                if not dry_run:
                    os.unlink(path)  # first the name: no new use finds it
                    shutil.rmtree(target, ignore_errors=True)
                removed.append({"id": f"environment {name}", "path": path, "bytes": size, "files": files + 1})
        elif os.path.isdir(path) and not name.startswith(".") and name not in linked:
            try:
                age = now - os.lstat(path).st_mtime
            except FileNotFoundError:
                continue
            if age >= max(older_than, _ORPHAN_AFTER_S):
                size, files = tree_usage(path)
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True)
                removed.append({"id": f"unpublished environment build {name}", "path": path, "bytes": size,
                                "files": files})
    return removed, kept


def list_environments(root: str) -> list[dict[str, Any]]:
    """The published environments under `root`, for `du`: key, requirements, size, last use."""
    from hpc_serverless.core.sessions import tree_usage

    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not os.path.islink(path):
            continue
        target = os.path.join(root, os.readlink(path))
        try:
            meta = json.loads(LOCAL.read_bytes(os.path.join(target, META)))
        except (OSError, ValueError):
            meta = {}
        size, files = tree_usage(target)
        out.append({"key": name, "path": path, "requirements": meta.get("requirements", []),
                    "last_used": _last_used(target), "bytes": size, "files": files})
    return out


def _last_used(env_dir: str) -> float | None:
    for name in (LAST_USED, META):
        try:
            raw = LOCAL.read_bytes(os.path.join(env_dir, name))
        except OSError:
            continue
        try:
            return float(raw.decode().strip()) if name == LAST_USED else float(json.loads(raw)["built"])
        except (ValueError, KeyError, TypeError):
            continue
    return None
