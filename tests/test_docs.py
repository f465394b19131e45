"""Every command the README and docs/ show composes into a config that passes the checks."""

import re
import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from kwta_lightning.overrides import bad_override
from kwta_lightning.validation import check_values
from tests.helpers import ROOT, compose_config

CONF = ROOT / "conf"
ENTRY_POINTS = {
    "train.py": "train",
    "attack.py": "attack",
    "-m kwta_lightning.landscape": "landscape",
    "-m kwta_lightning.toy1d": "toy1d",
}
COMMAND = re.compile(r"uv run python (train\.py|attack\.py|-m kwta_lightning\.(?:landscape|toy1d))")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, config name, overrides) of each documented command; an example of a wrong
    value (a line starting with ``$ ``) and shell placeholders (``<run>``, ``$S``, ``...``) are
    left out."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            match = COMMAND.search(line)
            if match is None or line.lstrip().startswith("$ "):
                continue
            rest = line[match.end() :].split(" #")[0].split("`")[0].split(">")[0].rstrip(" \\")
            try:
                words = shlex.split(rest)
            except ValueError:  # a command cut short inside a quote (an inline mention)
                words = rest.split()
            words = [w for w in words if "=" in w and not re.search(r"[<$']|\.\.\.", w)]
            found.append((f"{doc.name}:{number}", ENTRY_POINTS[match.group(1)], words))
    return found


COMMANDS = documented_commands()


def first_choices(overrides: list[str]) -> list[str]:
    """A sweep's first job: each swept value replaced by its first choice."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]


def test_the_docs_show_commands_of_every_entry_point():
    assert len(COMMANDS) >= 25
    assert {config for _, config, _ in COMMANDS} == set(ENTRY_POINTS.values())


@pytest.mark.parametrize(("where", "config", "overrides"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_documented_command_composes_and_passes_the_checks(tmp_path, where, config, overrides):
    assert bad_override(CONF, config, overrides) is None
    check_values(compose_config(config, tmp_path, first_choices(overrides)))
