"""How our code starts inside a job, so that the job's working directory cannot shadow it.

``python -m hpc_serverless.x`` puts the working directory first on ``sys.path``; a job
that starts in ``$HOME`` beside a folder called ``hpc_serverless`` (a site's storage, a
source checkout) then imports that folder instead of the package and dies with
"cannot import name ... (unknown location)". Python 3.11 has ``-P`` against this; 3.10
does not. So every process we start inside a job runs::

    python -c GUARD -m module args...     (instead of python -m module args...)
    python -c GUARD script.py args...     (a program's entrypoint, instead of python script.py)

``GUARD`` imports ``hpc_serverless`` with the working directory taken off ``sys.path``
and then hands over to :func:`main`. The user's relative paths work as before: the
working directory is unchanged; for ``-m`` it is back on ``sys.path`` at the end (modules
beside the submission still import, none can shadow an installed one); for a script,
the script's folder is first, as for ``python script.py``.
"""

from __future__ import annotations

import os
import runpy
import shlex
import sys
from typing import Sequence

__all__ = ["GUARD", "module_argv", "script_argv", "module_command", "main"]

#: one line (it shows in job scripts and logs): import the package from a sys.path without
#: the working directory, then let hpc_serverless.core.launch run the rest
GUARD = ("import os, sys; _c = os.path.realpath(os.getcwd()); _s = sys.path[:]; "
         "sys.path[:] = [p for p in _s if p and os.path.realpath(p) != _c]; import hpc_serverless; "
         "sys.path[:] = [p for p in _s if p]; from hpc_serverless.core.launch import main; main()")


def module_argv(python: str, module: str, *args: str, unbuffered: bool = False) -> list[str]:
    """argv that runs ``python -m module args`` behind the guard."""
    return [python, *(["-u"] if unbuffered else []), "-c", GUARD, "-m", module, *args]


def script_argv(python: str, script: str, *args: str) -> list[str]:
    """argv that runs ``python script args`` behind the guard."""
    return [python, "-c", GUARD, script, *args]


def module_command(python: str, module: str, *args: str, unbuffered: bool = False) -> str:
    """The same as one shell word list; `python` may already be a shell fragment
    (``exec /path/python``), everything else is quoted."""
    rest = module_argv("", module, *args, unbuffered=unbuffered)[1:]
    return " ".join([python, *map(shlex.quote, rest)])


def main(argv: Sequence[str] | None = None) -> None:
    """Run what follows the guard: ``-m module args`` or ``script args``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("hpc_serverless.core.launch: nothing to run (expected -m MODULE or SCRIPT)")
    if args[0] == "-m":
        module = args[1]
        sys.argv = [module, *args[2:]]  # run_module puts the module's file in argv[0]
        sys.path.append("")  # the working directory, last: its modules import, shadow nothing
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = args[0]
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
