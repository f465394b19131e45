"""Sweep jobs that outlive their training: each job trains in a child process it watches.

A job killed outright (SIGKILL from the out-of-memory killer, a segfault) takes its process with
it; under joblib that process is a pool worker, and its death aborts the whole sweep. So the
task function of a sweep job starts ``train.py`` for its job in a child process and waits: the
job process survives the child's death, records it in the job folder's error.txt and returns
None (a failed job, a failed Optuna trial), and the sweep goes on.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"  # a failed run's error line (and traceback), in its folder
SWEEP_JOB = "KWTA_SWEEP_JOB"  # set in a job's child: its sweep folder, number and overrides (JSON)
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DDP_CHILD_ARGS = "KWTA_DDP_CHILD_ARGS"  # the job a DDP child process must run (JSON list)
NO_HYDRA_OUTPUT = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def ddp_child_argv(argv: list[str]) -> list[str]:
    """The command line this process must run: ``argv``, unless it is a DDP process of rank > 0.

    Lightning's DDP launcher re-runs the script with the parent's command line. Under Hydra that
    would open new run folders and logs, and under ``-m`` start the whole sweep again. So the
    parent puts its own job in $KWTA_DDP_CHILD_ARGS (see ``_pin_ddp_children``) and a child
    (LOCAL_RANK > 0) runs exactly that job, in the parent's folder. Processes that srun or
    torchrun started (SLURM_PROCID or RANK > 0) keep their command line but write no Hydra files.
    """
    if int(os.environ.get("LOCAL_RANK", "0")) > 0 and DDP_CHILD_ARGS in os.environ:
        return [argv[0], *json.loads(os.environ[DDP_CHILD_ARGS])]
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) > 0:
        return [*argv, *NO_HYDRA_OUTPUT]
    return argv


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun (not the child a job trains in)."""
    if SWEEP_JOB in os.environ:
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job() -> dict[str, Any] | None:
    """In the child process a sweep job trains in: which job it is (else None)."""
    value = os.environ.get(SWEEP_JOB)
    return None if value is None else json.loads(value)


def record_failure(output_dir: Path, line: str, details: str = "") -> None:
    """Write the job's error.txt: one line (what the summary shows), then the details."""
    (output_dir / ERROR_FILE).write_text(f"error: {line}\n\n{details}")


def _death(returncode: int) -> str:
    """What a child's exit status says, for one that could not say it itself."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (what the out-of-memory killer sends)" if name == "SIGKILL" else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with status {returncode} without an error report"


class _Relay:
    """While the child runs: pass SIGTERM on to it, and note the signals this process got.

    The child gets SIGINT (a terminal's Ctrl-C) and SLURM's signals from the process group or
    the job step itself; this process must not die of them while the child saves its checkpoint.
    """

    def __init__(self, child: subprocess.Popen) -> None:
        self.child, self.received, self._previous = child, None, {}

    def __enter__(self) -> "_Relay":
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in FORWARDED}
        except ValueError:  # not the main thread: no handlers (and no signals to relay)
            self._previous = {}
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGUSR1:  # SLURM's requeue signal: the child saves and requeues
            return
        self.received = signum
        if signum == signal.SIGTERM:
            self.child.send_signal(signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def job_command(extra_overrides: list[str], output_dir: Path) -> list[str]:
    """train.py for this job alone, in its own folder, writing no second set of .hydra files."""
    hydra = HydraConfig.get()
    return [
        sys.executable,
        str(TRAIN_SCRIPT),
        *hydra.overrides.task,
        *extra_overrides,
        f"hydra.run.dir={output_dir.resolve()}",
        "hydra.mode=RUN",  # a sweep's overrides (hparams_search=optuna) may ask for MULTIRUN
        "hydra.output_subdir=null",
    ]


def run_in_child(output_dir: Path, extra_overrides: list[str]) -> dict[str, Any] | None:
    """Train this sweep job in a child process; its metrics, or None when it failed.

    A failure the child could not report (it was killed) is written to error.txt here. When
    this process itself got SIGTERM or SIGINT the sweep stops: SystemExit after the child is done.
    """
    (output_dir / ERROR_FILE).unlink(missing_ok=True)
    hydra = HydraConfig.get()
    job = {
        "sweep_dir": str(hydra.sweep.dir),
        "num": hydra.job.num,
        "overrides": list(hydra.overrides.task),
    }
    child = subprocess.Popen(
        job_command(extra_overrides, output_dir), env=os.environ | {SWEEP_JOB: json.dumps(job)}
    )
    with _Relay(child) as relay:
        returncode = child.wait()
    if returncode == 0:
        return json.loads((output_dir / "metrics.json").read_text())
    if not (output_dir / ERROR_FILE).is_file():
        record_failure(output_dir, _death(returncode))
    log.error("job failed; the sweep goes on: %s", failure_line(output_dir))
    if relay.received is not None:
        raise SystemExit(128 + relay.received)
    return None


def failure_line(output_dir: Path) -> str:
    """The one line of a failed job's error.txt."""
    return (output_dir / ERROR_FILE).read_text().partition("\n")[0].removeprefix("error: ")
