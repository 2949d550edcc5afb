"""Configuration files: the QuantumServerless provider list and site configs.

Errors name the file, the key and (for YAML) the line, so a typo is found at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hpc_serverless.core.errors import ConfigError

if TYPE_CHECKING:
    from hpc_serverless.providers.base import Provider

__all__ = ["read_config_file", "parse_serverless_config", "key_line"]

#: keys of a provider entry besides the site's own keys
CONNECTION_KEYS = ("name", "site", "host", "port", "username", "password", "key_filename", "python",
                   "known_hosts", "ssh_config", "trust_unknown_hosts")
LOCAL_KEYS = ("name", "store", "cpus", "mem")


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


def _err(message: str, source: str | None, keys: tuple[Any, ...]) -> ConfigError:
    key = ".".join(str(k) if not isinstance(k, int) else f"[{k}]" for k in keys).replace(".[", "[")
    return ConfigError(message, file=source, key=key or None, line=key_line(source, keys))


def parse_serverless_config(config: Mapping[str, Any], *,
                            source: str | None = None) -> tuple[list[Provider], str | None]:
    """Providers and the default provider's name from a QuantumServerless configuration."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"a configuration must be a mapping, not {type(config).__name__}", file=source)
    unknown = sorted(set(config) - {"providers", "default"})
    if unknown:
        raise _err(f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys are: providers, default",
                   source, (unknown[0],))
    entries = config.get("providers") or []
    if not isinstance(entries, list):
        raise _err("'providers' must be a list of provider entries", source, ("providers",))
    providers: list[Provider] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = ("providers", i)
        if not isinstance(entry, Mapping):
            raise _err("a provider entry must be a mapping with at least a 'name'", source, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _err("a provider entry needs a 'name' (a non-empty string)", source, where)
        if name in seen:
            raise _err(f"provider name {name!r} appears twice", source, (*where, "name"))
        seen.add(name)
        providers.append(_provider_from_entry(dict(entry), source, where))
    default = config.get("default")
    if default is not None and not isinstance(default, str):
        raise _err("'default' must be a provider name", source, ("default",))
    return providers, default


def _provider_from_entry(entry: dict[str, Any], source: str | None, where: tuple[Any, ...]) -> Provider:
    from hpc_serverless.providers.local import LocalProvider

    is_site = "site" in entry or "scheduler" in entry
    if not is_site:
        unknown = sorted(set(entry) - set(LOCAL_KEYS))
        if unknown:
            raise _err(f"unknown key(s) {', '.join(map(repr, unknown))} for a local provider; "
                       f"valid keys are: {', '.join(LOCAL_KEYS)} (or give 'site' for a cluster)",
                       source, (*where, unknown[0]))
        return LocalProvider(entry["name"], store=entry.get("store"), cpus=entry.get("cpus"),
                             mem=entry.get("mem"))
    from hpc_serverless.providers.factory import provider_from_entry

    return provider_from_entry(entry, source=source, where=where)
