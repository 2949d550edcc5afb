"""Reading configuration files (YAML or JSON) so that errors can point into them.

Errors name the file, the key and (for YAML) the line, so a typo is found at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hpc_serverless.core.errors import ConfigError

__all__ = ["config_error", "key_line", "read_config_file"]


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON mapping; errors name the file and the line."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError("configuration file not found", file=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file: {exc}", file=str(p)) from exc
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed JSON: {exc.msg}", file=str(p), line=exc.lineno) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"malformed YAML: {problem}", file=str(p),
                              line=mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the file must hold a mapping (key: value), not a {type(data).__name__}",
                          file=str(p))
    return data


def key_line(path: str | None, keys: tuple[Any, ...]) -> int | None:
    """The 1-based line of a nested key in a YAML file (None if unknown)."""
    if not path or not os.path.exists(path) or path.endswith(".json"):
        return None
    import yaml

    try:
        node = yaml.compose(Path(path).read_text())
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def config_error(message: str, source: str | None, keys: tuple[Any, ...]) -> ConfigError:
    """A ConfigError naming the file, the dotted key and (for YAML) its line."""
    key = ".".join(str(k) if not isinstance(k, int) else f"[{k}]" for k in keys).replace(".[", "[")
    return ConfigError(message, file=source, key=key or None, line=key_line(source, keys))
