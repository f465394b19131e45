"""The README, docs/ and benchmarks/README.md stay true: every command they show composes into a
config that passes the checks, every relative link resolves, and every file, module, config
option and console script they name exists."""

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from kwta_lightning.run.overrides import bad_override
from kwta_lightning.run.validation import check_values
from tests.helpers import ROOT, compose_config, needs_mnist, run_cli

CONF = ROOT / "conf"
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
]
CONFIGS = {"train", "attack", "landscape", "toy1d"}
# uv run python train.py | attack.py, or the console scripts kwta-train | kwta-attack |
# kwta-landscape | kwta-toy1d
COMMAND = re.compile(
    r"uv run (?:python (?P<script>train|attack)\.py|kwta-(?P<cli>train|attack|landscape|toy1d))"
    r"(?![\w.-])"
)
FENCE = re.compile(r"^\s*```")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code (where a link or heading means one)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, config name, overrides) of each documented command; an example of a wrong
    value (a line starting with ``$ ``) and shell placeholders (``<run>``, ``$S``, ``...``) are
    left out."""
    found = []
    for doc in DOCS:
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
            config = match.group("script") or match.group("cli")
            found.append((f"{doc.relative_to(ROOT)}:{number}", config, words))
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
    assert {config for _, config, _ in COMMANDS} == CONFIGS


@pytest.mark.parametrize(("where", "config", "overrides"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_documented_command_composes_and_passes_the_checks(tmp_path, where, config, overrides):
    assert bad_override(CONF, config, overrides) is None
    check_values(compose_config(config, tmp_path, first_choices(overrides)))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose(doc.read_text().replace("`", "")), re.M):
        name = slug(heading)
        found.add(f"{name}-{counts[name]}" if name in counts else name)
        counts[name] = counts.get(name, 0) + 1
    return found


def relative_links(doc: Path) -> list[str]:
    """Every link and image target of a page that is not a web address."""
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(doc.read_text()))
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_points_at_a_file_that_exists(doc):
    broken = []
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT)}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    assert not [d.name for d in DOCS[1:] if d not in linked]


def python_name_exists(dotted: str) -> bool:
    """``kwta_lightning.x.y``: a module, or a name a module defines (def, class, assignment)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:end])
        source = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if source.is_file():
            rest = parts[end:]
            if not rest:
                return True
            pattern = rf"^(?:def|class)\s+{rest[0]}\b|^{rest[0]}\s*[:=]"
            return len(rest) == 1 and re.search(pattern, source.read_text(), re.M) is not None
    return False


def named_things(text: str) -> list[str]:
    """What a page names that must exist: repository paths, kwta_lightning modules and names,
    `python -m` modules, console scripts and config group options (``act=kwta``)."""
    problems = []
    for path in re.findall(
        r"(?<![\w./~-])((?:kwta_lightning|conf|benchmarks|tests|docs|\.ci)/[\w./-]*)", text
    ):
        if not (ROOT / path.rstrip(".")).exists():
            problems.append(f"no file {path}")
    for dotted in re.findall(r"(?<![\w/.-])kwta_lightning(?:\.\w+)+", text):
        if not python_name_exists(dotted.rstrip(".")):
            problems.append(f"no module or name {dotted}")
    for module in re.findall(r"python -m (kwta_lightning(?:\.\w+)+)", text):
        file = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        if not file.is_file() or "__main__" not in file.read_text():
            problems.append(f"python -m {module} runs nothing")
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.partition("[project.scripts]")[2].partition("\n[")[0]
    scripts = re.findall(r"^([\w-]+)\s*=", section, re.M)
    for script in re.findall(r"uv run (kwta-[\w-]+)", text):
        if script not in scripts:
            problems.append(f"no console script {script}")
    for group, options in re.findall(
        r"(?<![\w.+/-])([a-z_]+)=([a-z]\w*(?:,[a-z]\w*)*)(?![\w./-])", text
    ):
        for option in options.split(","):  # a sweep's choices too
            if (CONF / group).is_dir() and not (CONF / group / f"{option}.yaml").is_file():
                problems.append(f"no config {group}={option}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_the_files_modules_and_options_the_docs_name_exist(doc):
    problems = named_things(doc.read_text())
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(dict.fromkeys(problems))


# The README's first result in miniature: its commands as written, with these budgets added.
MINIATURE = {
    "train.py": ["data.train_subset=256", "data.val_subset=64", "data.test_subset=64"],
    "attack.py": [
        "n_samples=8",
        "batch_size=8",
        "attack.pgd.steps=2",
        "attack.pgd.restarts=1",
        "attack.bpda.attack.steps=2",
        "attack.bpda.temperatures=[0.1]",
        "diagnostics.unbounded_steps=2",
        "diagnostics.convergence_doublings=0",
        "cache_dir=null",
        "wandb.mode=disabled",
    ],
}


def first_result_commands() -> list[list[str]]:
    """The ``uv run`` commands of the README's first-result section, ``$NAME`` expanded from its
    ``NAME=value`` lines, each as the words after ``uv run``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train, attack, summarise")[1].split("\n## ")[0]
    names = dict(re.findall(r"\b([A-Z]+)=(\S+)", section))
    commands = []
    for line in section.splitlines():
        if line.startswith("uv run "):
            expanded = re.sub(r"\$([A-Z]+)", lambda m: names[m.group(1)], line)
            commands.append(shlex.split(expanded)[2:])
    return commands


def run_in(folder: Path, words: list[str]) -> None:
    script = words[1] if words[0] == "python" else words[0]
    args = words[2:] if words[0] == "python" else words[1:]
    result = run_cli(*args, *MINIATURE.get(script, []), script=script, cwd=folder)
    assert result.returncode == 0, f"{' '.join(words)}: {result.stderr[-3000:]}"


@pytest.mark.slow
@needs_mnist
def test_the_readme_first_result_runs_in_miniature(tmp_path):
    commands = first_result_commands()
    trains = [c for c in commands if c[:2] == ["python", "train.py"]]
    (quick,) = [c for c in commands if "attack=[pgd,bpda]" in c]
    (summarize,) = [c for c in commands if c[0] == "kwta-summarize"]
    assert len(trains) == 2
    for words in trains:
        run_in(tmp_path, words)
    kwta_ckpt = next(w for w in quick if w.startswith("ckpt_path=")).partition("=")[2]
    for model in ("kwta", "relu"):  # the quick look for each model, where step 3 reads them
        ckpt = kwta_ckpt.replace("/kwta/", f"/{model}/")
        words = [f"ckpt_path={ckpt}" if w.startswith("ckpt_path=") else w for w in quick]
        run_in(tmp_path, [*words, f"hydra.run.dir=outputs/mnist/{model}_preset"])
    run_in(tmp_path, summarize)
    rows = (tmp_path / "outputs" / "mnist" / "summary.md").read_text().splitlines()[2:]
    assert len(rows) == 2 and all("kwta" in r or "relu" in r for r in rows), rows
