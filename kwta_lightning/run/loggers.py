"""Loggers and logger factories the logger configs instantiate.

A resumed run logs into the same places as the run it continues: the CSV file grows (rows of
the work lost since the checkpoint are dropped), the W&B run is the same run (its id is kept in
the run folder), TensorBoard adds event files to the same folder.
"""

import csv
import netrc
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import wandb
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from kwta_lightning.run.jobs import in_sweep, sweep_job

MAX_TAG_LENGTH = 64  # W&B refuses longer tags


def _wandb_server() -> str:
    """The W&B server wandb talks to: $WANDB_BASE_URL, else wandb's default."""
    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def _has_wandb_key(server: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    machines = {urlsplit(server).netloc}
    if server == wandb.Settings().base_url:
        machines.add("api.wandb.ai")  # wandb's default server's key, as older wandb logins saved it
    try:
        credentials = netrc.netrc()
    except (OSError, netrc.NetrcParseError):
        return False
    return any(credentials.authenticators(machine) is not None for machine in machines)


def _can_reach(server: str, timeout_s: float = 2.0) -> bool:
    url = urlsplit(server)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def wandb_mode(mode: str = "auto") -> str:
    """``auto``: $WANDB_MODE if set, else online with an API key and network, else offline.

    wandb has no such fallback: online without a key it asks for one (fails without a terminal),
    online without network it waits out its init timeout and fails. So ``auto`` looks first, at
    the server wandb would use ($WANDB_BASE_URL, else wandb's default).
    """
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    server = _wandb_server()
    return "online" if _has_wandb_key(server) and _can_reach(server) else "offline"


def sweep_group_and_tags() -> tuple[str | None, list[str]]:
    """In a Hydra sweep job: the sweep folder's name and the job's overrides (``gamma=0.05``, ...).

    Outside a sweep: (None, []).
    """
    if in_sweep():
        hydra = HydraConfig.get()
        sweep_dir, overrides = hydra.sweep.dir, list(hydra.overrides.task)
    elif (job := sweep_job()) is not None:  # the process a sweep job trains in
        sweep_dir, overrides = job["sweep_dir"], job["overrides"]
    else:
        return None, []
    return Path(sweep_dir).name, [o for o in overrides if len(o) <= MAX_TAG_LENGTH]


RUN_ID_FILE = Path("wandb") / "run_id"  # in the logger's save_dir, the run folder


def saved_run_id(run_dir: str | Path) -> str | None:
    """The W&B run id saved in a run folder by its WandbLogger; None when it had none."""
    path = Path(run_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def _run_id(save_dir: str) -> str:
    """The W&B run id of the run folder: made on its first run, read back on every resume."""
    if (run_id := saved_run_id(save_dir)) is not None:
        return run_id
    path = Path(save_dir) / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def wandb_logger(
    save_dir: str,
    project: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    mode: str = "auto",
) -> WandbLogger:
    """A WandbLogger that runs offline when W&B cannot be reached (sync later with wandb sync).

    Each job of a sweep is its own W&B run (training.py finishes it at the end of the job); the
    jobs of one sweep share a group named after the sweep folder (unless ``group`` is given) and
    are tagged with their overrides. A resumed run continues its W&B run (same id).
    """
    sweep, job_tags = sweep_group_and_tags()
    return WandbLogger(
        save_dir=save_dir,
        id=_run_id(save_dir),
        resume="allow",
        project=project,
        name=name,
        group=group or sweep,
        tags=[str(t) for t in tags] + job_tags,
        mode=wandb_mode(mode),
        settings=quiet_wandb(),
    )


def quiet_wandb() -> wandb.Settings:
    """W&B without its run summary and history on the console (the run's own summary says it)."""
    return wandb.Settings(quiet=True)


def log_images_to_wandb(
    mode: str, project: str, job_type: str, output_dir: str, images: dict[str, Path], summary: dict
) -> None:
    """Log figures (and numbers) as a W&B run of their own, unless W&B is disabled."""
    mode = wandb_mode(mode)
    if mode == "disabled":
        return
    run = wandb.init(
        project=project, job_type=job_type, dir=output_dir, mode=mode, settings=quiet_wandb()
    )
    try:
        run.log({name: wandb.Image(str(path)) for name, path in images.items()} | summary)
    finally:
        wandb.finish()


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows already in metrics.csv (Lightning deletes them)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class AppendingCSVLogger(CSVLogger):
    """A CSVLogger whose metrics.csv survives resumes and re-runs: new rows are appended.

    Rows are written at every checkpoint too, so a kill loses none that the checkpoint covers.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def drop_rows_from(self, step: int) -> None:
        """Drop the rows of steps >= ``step``: work after the checkpoint a run resumes from."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not row.get("step") or int(row["step"]) < step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()


class AppendingTensorBoardLogger(TensorBoardLogger):
    """A TensorBoardLogger that a resumed run continues in the same folder."""

    def purge_from(self, step: int) -> None:
        """Hide the events of steps >= ``step`` (work after the checkpoint the run resumes from).

        SummaryWriter's ``purge_step`` writes a restart marker; TensorBoard drops older files'
        events from that step on when it reads the folder.
        """
        self._kwargs["purge_step"] = step  # Lightning passes its extra kwargs to SummaryWriter
