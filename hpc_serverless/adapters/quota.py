"""How far a user is from their disk quota: `lfs quota` (Lustre) and `quota` (Linux), run
through the site's transport and parsed here. Both print a table whose numbers are
blocks/kbytes used, soft quota, hard limit, grace, then files used, soft, hard, grace; a
number may carry a `*` (over quota) and a wrapped filesystem name puts the numbers on the
next line. What cannot be read is "unknown", never a guess.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import Transport

__all__ = ["Quota", "parse_quota", "site_quota"]


@dataclass(frozen=True)
class Quota:
    """One filesystem's usage and limits (bytes and files; None where there is no limit)."""

    filesystem: str
    bytes_used: int
    bytes_limit: int | None
    files_used: int
    files_limit: int | None
    source: str

    def describe(self) -> str:
        def part(used: int, limit: int | None, unit: str) -> str:
            if not limit:
                return f"{used:,} {unit} (no limit)"
            return f"{used:,} of {limit:,} {unit} ({100 * used / limit:.0f}%, {limit - used:,} left)"

        return (f"{self.filesystem}: {part(self.bytes_used, self.bytes_limit, 'bytes')}; "
                f"{part(self.files_used, self.files_limit, 'files')} [{self.source}]")


def _num(text: str) -> int | None:
    m = re.fullmatch(r"(\d+)\*?([kKmMgGtT]?)", text)
    if not m:
        return None
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * scale


def parse_quota(text: str, source: str) -> list[Quota]:
    """The rows of `quota -w` or `lfs quota -u USER PATH` output (blocks are KiB in both)."""
    rows: list[Quota] = []
    pending = ""
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] in ("Disk", "Filesystem") or line.startswith("Disk quotas"):
            continue
        if len(words) == 1 and _num(words[0]) is None:  # a long name wrapped onto its own line
            pending = words[0]
            continue
        name, numbers = (pending, words) if pending else (words[0], words[1:])
        pending = ""
        values = [w for w in numbers if w != "-" and not re.fullmatch(r"\d+[dhms].*|none", w)]
        nums = [_num(w) for w in values]
        if len(nums) < 6 or any(n is None for n in nums[:6]):
            continue
        used, soft, hard, fused, fsoft, fhard = (int(n or 0) for n in nums[:6])
        limit = hard or soft or None
        flimit = fhard or fsoft or None
        rows.append(Quota(name, used * 1024, limit * 1024 if limit else None, fused, flimit, source))
    return rows


def site_quota(transport: Transport, path: str) -> list[Quota] | str:
    """The quota rows for `path`'s filesystem, or one sentence of why they are unknown."""
    user = os.environ.get("USER", "")
    tried = []
    for argv, source in ((["lfs", "quota", "-u", user, path], "lfs quota"), (["quota", "-w"], "quota")):
        try:
            result = transport.run(argv, timeout=30.0)
        except Exception as exc:  # noqa: BLE001 - a missing tool is an answer too: unknown
            tried.append(f"{source}: {exc}")
            continue
        rows = parse_quota(result.stdout, source) if result.ok else []
        if rows:
            return rows
        tried.append(f"{source}: {result.describe() if not result.ok else 'no quota listed'}")
    return "unknown (" + "; ".join(tried) + ")"
