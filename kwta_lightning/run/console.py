"""The entry points' console: the config tree, the summary table, library noise turned off, and
the door every Hydra main goes through (its values checked; bad input as one line, exit 2)."""

import functools
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

from kwta_lightning.errors import KWTAError
from kwta_lightning.run.jobs import ERROR_FILE, in_sweep, record_failure
from kwta_lightning.run.validation import check_values

FIRST_SECTIONS = ("data", "model", "act", "gamma", "optimizer", "scheduler", "trainer")


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_TIPS, _DEEPFOOL = _Drop("💡 Tip"), _Drop("Only testing the top-")  # one of each: added once


def quiet_libraries() -> None:
    """Turn off the libraries' output that says nothing about the run (call it once they are
    imported: their import sets up their logging). Each with why:"""
    if logging.getLogger().handlers:
        # Lightning adds its own console handler and also passes each line on to the root's
        # (Hydra's: console and the run's log file), so every line came twice
        logging.getLogger("lightning").handlers.clear()
    # Lightning's advertisements for its cloud services
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_TIPS)
    # foolbox's DeepFool logs its number of candidate classes (a config value) at every batch
    logging.getLogger().addFilter(_DEEPFOOL)
    # Lightning's own use of a deprecated torch API: nothing a user can act on
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def rich_console() -> Console:
    """A rich console that cuts nothing in a log file or a pipe, where rich would assume 80
    columns and squeeze tables and paths to fit."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_config_tree(cfg: DictConfig) -> None:
    """The composed config as a rich tree, one branch per top-level key."""
    tree = Tree("config", guide_style="dim")
    keys = [k for k in FIRST_SECTIONS if k in cfg] + [k for k in cfg if k not in FIRST_SECTIONS]
    for key in keys:
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        tree.add(f"[bold]{key}[/bold]").add(
            Syntax(text.rstrip(), "yaml", background_color="default")
        )
    rich_console().print(tree)


def duration(seconds: float) -> str:
    """12m05s, or 1h05m from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, the separator, one line per row of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def print_summary(title: str, metrics: Mapping[str, Any]) -> None:
    """The final metrics as a table, then where the outputs are (paths stay whole)."""
    table = Table(title=title, show_header=False)
    table.add_column(overflow="fold")  # a long value wraps, never ends in "..."
    table.add_column(overflow="fold")
    paths = {}
    for key, value in metrics.items():
        if isinstance(value, str) and "/" in value:
            paths[key] = value
        else:
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    rich_console().print(table)
    for key, path in paths.items():
        print(f"{key}: {path}")


def _user_error(err: BaseException) -> BaseException | None:
    """The KWTAError or config error behind ``err`` (Hydra wraps constructor errors), if any."""
    chain = []
    while err is not None:
        chain.append(err)
        # OmegaConf re-raises a resolver's error without chaining it as the cause
        wrapped = err.__context__ if isinstance(err, OmegaConfBaseException) else None
        err = err.__cause__ or wrapped
    ours = [e for e in chain if isinstance(e, KWTAError)]  # ours says it best (a resolver's error)
    return next(iter(ours or [e for e in chain if isinstance(e, OmegaConfBaseException)]), None)


def error_line(err: BaseException) -> str:
    """One line for an error: the user error's message when there is one, else type and text."""
    cause = _user_error(err)
    if cause is None:
        return " ".join(f"{type(err).__name__}: {err}".split())
    return " ".join(str(cause).split())


def _to_log_files(line: str) -> None:
    """``line`` in the run's log file (Hydra's train.log, ...), not again on the console."""
    record = logging.LogRecord("kwta_lightning", logging.ERROR, "", 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_on_user_error(main: Callable) -> Callable:
    """Check a Hydra main's config values before any work, then run; print bad-input errors as
    one line on stderr and exit 2; let real bugs raise."""

    @functools.wraps(main)
    def wrapper(*args: Any) -> Any:
        try:
            if args and isinstance(args[0], DictConfig) and not in_sweep():
                check_values(args[0])  # a sweep's jobs check their own: one bad job fails alone
            result = main(*args)
        except Exception as err:
            line, ours = error_line(err), _user_error(err) is not None
            _mark_run_folder(line, "" if ours else traceback.format_exc())
            # a config whose target refuses its arguments (Trainer(foo=1)) is bad input too;
            # its traceback is in the run folder's error.txt, in case it is a bug after all
            if not (ours or isinstance(err, InstantiationException)):
                raise
            print(f"error: {line}", file=sys.stderr)
            _to_log_files(f"error: {line}")
            sys.exit(2)
        if not in_sweep():  # a sweep's job that failed keeps its error.txt
            _mark_run_folder(None)
        return result

    return wrapper


def _mark_run_folder(line: str | None, details: str = "") -> None:
    """A failed run's folder says so: error.txt with the error line (and the traceback of a
    bug); a run that succeeds removes an earlier one."""
    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    if line is None:
        (folder / ERROR_FILE).unlink(missing_ok=True)
    elif folder.is_dir():
        record_failure(folder, line, details)
