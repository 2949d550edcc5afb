"""A QuantumServerless configuration (the `providers` list and `default`) to provider specs.

Each entry becomes a `ProviderEntry`: a local provider's settings, or a `Site` with the
entry's connection overrides applied. Building the providers is the api's job
(providers/factory.py), so this layer stays below the providers it describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hpc_serverless.config.files import config_error, read_config_file
from hpc_serverless.config.site import Site, paths_beside, site_from_mapping
from hpc_serverless.core.errors import ConfigError

__all__ = ["CONNECTION_KEYS", "LOCAL_KEYS", "ProviderEntry", "parse_serverless_config"]

#: keys of a provider entry besides the site's own keys
CONNECTION_KEYS = ("name", "site", "host", "port", "username", "password", "key_filename", "python",
                   "known_hosts", "ssh_config", "trust_unknown_hosts")
LOCAL_KEYS = ("name", "store", "cpus", "mem", "qpus")


@dataclass(frozen=True)
class ProviderEntry:
    """One validated provider entry: `site` for a cluster, else `local` settings."""

    name: str
    site: Site | None = None
    password: str | None = field(default=None, repr=False)
    local: dict[str, Any] = field(default_factory=dict)


def parse_serverless_config(config: Mapping[str, Any], *,
                            source: str | None = None) -> tuple[list[ProviderEntry], str | None]:
    """Provider entries and the default provider's name from a QuantumServerless configuration."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"a configuration must be a mapping, not {type(config).__name__}", file=source)
    unknown = sorted(set(config) - {"providers", "default"})
    if unknown:
        raise config_error(f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys are: providers, default",
                           source, (unknown[0],))
    entries = config.get("providers") or []
    if not isinstance(entries, list):
        raise config_error("'providers' must be a list of provider entries", source, ("providers",))
    out: list[ProviderEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = ("providers", i)
        if not isinstance(entry, Mapping):
            raise config_error("a provider entry must be a mapping with at least a 'name'", source, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise config_error("a provider entry needs a 'name' (a non-empty string)", source, where)
        if name in seen:
            raise config_error(f"provider name {name!r} appears twice", source, (*where, "name"))
        seen.add(name)
        out.append(provider_entry(dict(entry), source=source, where=where))
    default = config.get("default")
    if default is not None and not isinstance(default, str):
        raise config_error("'default' must be a provider name", source, ("default",))
    return out, default


def provider_entry(entry: dict[str, Any], *, source: str | None = None,
                   where: tuple[Any, ...] = ()) -> ProviderEntry:
    """A local entry (store, cpus, mem, qpus), or a cluster entry: `site` (a path, relative to the
    config file) and/or inline site keys, plus connection overrides (host, port, username,
    password, key_filename, python)."""
    if "site" not in entry and "scheduler" not in entry:
        unknown = sorted(set(entry) - set(LOCAL_KEYS))
        if unknown:
            raise config_error(f"unknown key(s) {', '.join(map(repr, unknown))} for a local provider; "
                               f"valid keys are: {', '.join(LOCAL_KEYS)} (or give 'site' for a cluster)",
                               source, (*where, unknown[0]))
        return ProviderEntry(entry["name"], local={k: entry.get(k) for k in ("store", "cpus", "mem", "qpus")})
    entry = dict(entry)
    name = entry.pop("name")
    password = entry.pop("password", None)
    site_ref = entry.pop("site", None)
    data: dict[str, Any] = {}
    site_source = source
    base: tuple[Any, ...] = where
    if site_ref is not None:
        if not isinstance(site_ref, str):
            raise ConfigError("'site' must be a path to a site file", file=source,
                              key=".".join(map(str, (*where, "site"))))
        path = Path(site_ref).expanduser()
        if not path.is_absolute() and source and not path.exists():
            path = Path(source).parent / path
        data = read_config_file(path)
        site_source, base = str(path), ()
        if entry and not data.get("host"):  # inline keys: the file's relative paths stay the file's
            data = paths_beside(data, str(path.parent.resolve()))
    overrides = {k: entry.pop(k) for k in list(entry) if k in CONNECTION_KEYS}
    data.update(entry)  # inline site keys win over the file's
    data.update(overrides)
    data.setdefault("name", name)
    site = site_from_mapping(data, source=site_source if not entry else source, base=base)
    return ProviderEntry(name, site=site, password=password)
