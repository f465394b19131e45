"""Command-line overrides checked before Hydra runs: an unknown option of a config group, a key
the config does not have, an override Hydra cannot parse, or a run folder that cannot be made
stops with one line that names it (and the known names, or the nearest key).

Hydra's own errors for these run to many lines ending on its search path or "object_type=dict",
for a mistyped key suggest ``+gama=0.1``, which would add the typo as a new key and run with the
default gamma, and for a run folder under a file end in a traceback. An option of Hydra's own
groups (``hydra/launcher=...``, whose options the installed plugins add) is checked by letting
Hydra compose it.
"""

import difflib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

_ABSENT = object()


def _options(conf: Path, group: str) -> list[str]:
    """A group's options; ``_base``-like files are what options build on, not options."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml") if not p.stem.startswith("_"))


def _unknown_hydra_option(conf: Path, config_name: str, override: Override) -> str | None:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf.resolve()), version_base="1.3"):
            compose(config_name, overrides=[override.input_line], return_hydra_config=True)
    except MissingConfigException as err:
        group = override.key_or_group
        return f"unknown {group} {override.value()}; known: {', '.join(err.options or [])}"
    except HydraException:
        return None  # not an unknown option: Hydra will say what is wrong
    finally:
        GlobalHydra.instance().clear()
    return None


def _names(override: Override) -> list[str]:
    """The options an override of a config group picks (one, a list, or a sweep's)."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None and str(v) != "null"]


def _keys(node: DictConfig, path: str = "") -> Iterator[str]:
    for key in node:
        where = f"{path}.{key}" if path else str(key)
        yield where
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _keys(child, where)


def _unparsable(args: list[str]) -> str:
    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_overrides([arg])
        except HydraException as err:
            first = str(err).strip().splitlines()[0]
            key, _, value = arg.partition("=")
            if "=" in value:
                return f"{arg}: a value with '=' in it needs quotes: '{key}=\"{value}\"'"
            return f"{arg}: not an override Hydra can read ({first})"
    return "the overrides cannot be read"


def _run_folder(key: str, path: str) -> str | None:
    """Why ``path`` cannot become a run folder, or None."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={path}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK):
        return f"{key}={path}: {existing} is not writable"
    return None


def bad_override(conf: Path, config_name: str, args: list[str]) -> str | None:
    """The error line for the first bad override in ``args``, or None."""
    args = [a for a in args if "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return _unparsable(args)
    picks, values = [], []
    for override in overrides:
        key = override.key_or_group
        if key in ("hydra.run.dir", "hydra.sweep.dir") and (
            why := _run_folder(key, str(override.value()))
        ):
            return why
        if key.startswith("hydra/") and (why := _unknown_hydra_option(conf, config_name, override)):
            return why
        if override.is_delete() or key.split("/")[0].split(".")[0] == "hydra":
            continue
        if (conf / key).is_dir():
            known = _options(conf, key)
            names = _names(override)
            if unknown := [n for n in names if n not in known]:
                return f"unknown {key} {', '.join(unknown)}; known: {', '.join(known)}"
            if names:  # a sweep's first choice stands for the others
                listed = isinstance(override.value(), list) and not override.is_sweep_override()
                picks.append(f"{key}=[{','.join(names)}]" if listed else f"{key}={names[0]}")
        elif not (override.is_add() or override.is_force_add()):
            values.append(key)
    if not values:
        return None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf.resolve()), version_base="1.3"):
            cfg = compose(config_name, overrides=picks)
    except HydraException:
        return None  # Hydra will say what is wrong
    finally:
        GlobalHydra.instance().clear()
    for key in values:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=_ABSENT) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in list(node):  # `in` skips ??? values
            close = difflib.get_close_matches(key, list(_keys(cfg)), n=3, cutoff=0.75)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            return f"{key} is not a key of the config{hint}; to add a new key, write +{key}=..."
    return None


def exit_on_bad_override(conf: Path, config_name: str, args: list[str]) -> None:
    """Print the error line and exit 2 when ``args`` hold a bad override."""
    if (line := bad_override(conf, config_name, args)) is not None:
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
