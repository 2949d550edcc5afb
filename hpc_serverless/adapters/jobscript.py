"""Rendering batch scripts from the templates in ``jobscripts/`` (one helper, one place).

Every value that came from a user is quoted here; templates only have @SLOTS@.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from hpc_serverless.config.site import Site

_SLOT = re.compile(r"@([A-Z_]+)@")


def template(name: str) -> str:
    """The text of jobscripts/<name> (from the installed package)."""
    return resources.files("hpc_serverless.jobscripts").joinpath(name).read_text()


def render(name: str, slots: Mapping[str, str]) -> str:
    """Fill a template's @SLOTS@; a slot left unfilled is a bug, not a silent blank."""
    text = template(name)
    missing = sorted(set(_SLOT.findall(text)) - set(slots))
    if missing:
        raise KeyError(f"template {name} has unfilled slots: {', '.join(missing)}")
    return _SLOT.sub(lambda m: slots[m.group(1)], text)


def export_lines(env: Mapping[str, str]) -> str:
    """`export NAME=value` lines, values shell-quoted (names are checked identifiers)."""
    for k in env:
        if not k.isidentifier():
            raise ValueError(f"{k!r} is not an environment variable name")
    return "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in env.items())


def job_preamble(site: Site, store_root: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The lines every task and pilot job of a site runs before our command: the site's setup,
    then its environment (and `env` over it), where the object store is, and where the site's
    scheduler commands are (the worker requeues through them)."""
    exports = {**site.env, **(env or {}), "HPC_SERVERLESS_STORE": store_root}
    if site.commands_dir:
        exports["HPC_SERVERLESS_COMMANDS_DIR"] = site.commands_dir
    return [*site.setup, export_lines(exports)]


def command_line(argv: Sequence[str]) -> str:
    return "exec " + shlex.join(argv)


def comment_safe(text: str) -> str:
    """A user string made safe to sit in a `#` comment line (no newline escapes it)."""
    return re.sub(r"[\r\n]+", " ", text)[:200]


def render_program(template_name: str, *, directives: Sequence[str], job_id: str, job_dir: str,
                   setup: Sequence[str], env: Mapping[str, str], workdir: str,
                   command: Sequence[str]) -> str:
    """A Program's batch script: every scheduler's template has the same slots."""
    return render(template_name, {
        "DIRECTIVES": "\n".join(directives), "JOB_ID": job_id, "JOB_DIR": shlex.quote(job_dir),
        "SETUP": "\n".join(setup) or "# (none)", "ENVIRONMENT": export_lines(env),
        "WORKDIR": shlex.quote(workdir), "COMMAND": command_line(command)})
