"""Shareable results: a checkpoint as plain weights, an attack report as a RobustBench entry.

uv run kwta-export model outputs/train/runs/<run>/checkpoints/best.ckpt --out DIR
uv run kwta-export robustbench outputs/attack/runs/<run> --out model_info.json [--eps 0.1]

``model`` writes DIR/model.safetensors, the state dict of the network ``build_network`` returns
(normalisation, then the backbone), and DIR/model.json, what rebuilds it. :func:`load_network`
(or ``torch.hub.load(<checkout>, "kwta_classifier", source="local", weights=...)``) rebuilds it
with torch alone: loading imports neither Lightning nor the attack libraries.

``robustbench`` writes one attack report's verdict at one norm and eps as a RobustBench
``model_info`` JSON (the fields of RobustBench's ``model_info/<dataset>/<threat model>/*.json``).

torch is imported only where it is used, so a wrong argument is refused in about a second.
"""

import argparse
import inspect
import json
import math
import sys
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kwta_lightning.errors import KWTAError

if TYPE_CHECKING:
    from torch import nn

WEIGHTS, INFO = "model.safetensors", "model.json"
AUTOATTACK = "autoattack"
REPORT_KEYS = ("data", "model", "activation", "clean_acc", "verdict", "results")


def network_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters ``build_network`` takes, as the checkpoint holds them.

    Read from its signature, so an argument added to it travels without a change here.
    ``pretrained`` is left out: the exported weights replace them, and loading must not download.
    """
    from kwta_lightning.core.backbones import build_network

    names = inspect.signature(build_network).parameters
    return {k: hparams[k] for k in names if k in hparams and k != "pretrained"}


def _build(network: Mapping[str, Any], weights: Mapping[str, Any], source: Path) -> "nn.Sequential":
    from kwta_lightning.core.backbones import build_network

    try:
        net = build_network(**network, pretrained=False)
        net.load_state_dict(weights, strict=True)
    except (TypeError, RuntimeError) as err:  # torch's missing and unexpected keys, on one line
        raise KWTAError(
            f"{source} does not rebuild its network ({' '.join(str(err).split())})"
        ) from None
    return net.eval()


def export_model(ckpt_path: Path, out: Path) -> dict[str, Any]:
    """Write ``out``/model.safetensors and ``out``/model.json from a train.py checkpoint; return
    the JSON's contents.

    The network is rebuilt and loaded strictly before anything is written, so an export that
    would not load again is refused here.
    """
    import safetensors.torch

    from kwta_lightning.attacks.store import file_sha256
    from kwta_lightning.run.checkpoints import load_weights_only

    ckpt = load_weights_only(ckpt_path, ("state_dict", "hyper_parameters"))
    data = ckpt.get("datamodule_hyper_parameters", {})
    info = {
        "network": network_options(ckpt["hyper_parameters"]),
        "data": data.get("name"),
        "threat": data.get("threat"),
        "source_checkpoint": str(ckpt_path.resolve()),
        "source_checkpoint_sha256": file_sha256(ckpt_path),
    }
    state = ckpt["state_dict"]  # KWTAClassifier's: its network is .net (metrics hold no weights)
    weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    net = _build(info["network"], weights, ckpt_path)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory: each tensor gets its own copy
    tensors = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    safetensors.torch.save_file(tensors, out / WEIGHTS)
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise KWTAError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KWTAError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise KWTAError(f"{path} holds no JSON object")
    return value


def load_network(weights: str | Path, info: str | Path | None = None) -> "nn.Sequential":
    """The exported network (Normalize, then the backbone; pixels in [0, 1]) in eval mode.

    ``info``: the model.json written beside the weights (default: the weights' name ending in
    .json). Rebuilt with ``build_network``, the weights loaded strictly.
    """
    import safetensors
    import safetensors.torch

    weights = Path(weights)
    info_path = Path(info) if info is not None else weights.with_suffix(".json")
    network = _read_json(info_path).get("network")
    if not isinstance(network, dict):
        raise KWTAError(f"{info_path} is not a model.json of kwta-export (no 'network')")
    if not weights.is_file():
        raise KWTAError(f"{weights} does not exist")
    try:
        tensors = safetensors.torch.load_file(weights)
    except (safetensors.SafetensorError, OSError) as err:
        raise KWTAError(f"{weights} is not a safetensors file ({err})") from None
    return _build(network, tensors, weights)


def eps_string(eps: float) -> str:
    """eps as RobustBench writes it: a fraction that is no short decimal ("8/255", "4/255"),
    else the decimal ("0.5", "0.031", "0.3")."""
    fraction = Fraction(eps).limit_denominator(255)
    exact = math.isclose(fraction, eps, rel_tol=1e-9)
    q = fraction.denominator
    while q % 2 == 0:
        q //= 2
    while q % 5 == 0:
        q //= 5
    return f"{fraction.numerator}/{fraction.denominator}" if exact and q > 1 else str(eps)


def _percent(n_robust: int, n: int) -> str:
    """A count of inputs as RobustBench's accuracies: a percentage with two decimals."""
    return f"{100 * n_robust / n:.2f}"


def read_report(path: Path) -> dict[str, Any]:
    """report.json of an attack.py (or kwta-merge) folder, or the file itself."""
    report = _read_json(path / "report.json" if path.is_dir() else path)
    missing = [k for k in REPORT_KEYS if report.get(k) is None]
    if missing:
        raise KWTAError(f"{path} is not an attack report of attack.py (no {', '.join(missing)})")
    if report.get("complete") is False:
        raise KWTAError(
            f"{path} is incomplete (the attack run stopped or is still running); run the same "
            "attack.py command again to finish it"
        )
    return report


def _verdict(report: Mapping[str, Any], norm: str, eps: float | None) -> dict[str, Any]:
    """The verdict entry at ``norm`` and ``eps``; without eps, the one radius above 0."""
    here = [v for v in report["verdict"] if v["norm"] == norm and v["eps"] > 0]
    if eps is not None:
        here = [v for v in here if math.isclose(v["eps"], eps)]
    if len(here) == 1:
        return here[0]
    radii = ", ".join(f"{v['eps']:g}" for v in report["verdict"] if v["norm"] == norm)
    if not radii:
        raise KWTAError(f"the report has no {norm} results")
    if eps is not None:
        raise KWTAError(f"the report has no {norm} verdict at eps={eps:g}; it has {radii}")
    raise KWTAError(f"the report has {norm} radii {radii}; choose one with --eps")


def _autoattack(report: Mapping[str, Any], verdict: Mapping[str, Any]) -> int | None:
    """AutoAttack's robust count at the verdict's norm and eps (the lowest where a merged report
    holds it twice, as autoattack+), or None when it was not run there."""
    counts = [
        r["n_robust"]
        for r in report["results"]
        if r["attack"].rstrip("+") == AUTOATTACK
        and r["norm"] == verdict["norm"]
        and r["eps"] == verdict["eps"]
    ]
    return min(counts, default=None)


def model_info(
    report: Mapping[str, Any], norm: str = "linf", eps: float | None = None
) -> dict[str, Any]:
    """RobustBench's model_info fields from an attack report, at one norm and eps.

    ``autoattack_acc``: the reference AutoAttack's robust accuracy (null when it was not run);
    ``external``: the per-input worst case over every attack, when lower than AutoAttack's (or
    when AutoAttack was not run); ``unreliable``: gradient masking suspected. Fields the report
    cannot know (link, authors, venue, reported) are left for a person to add.
    """
    verdict = _verdict(report, norm, eps)
    n, worst, auto = verdict["n"], verdict["n_robust"], _autoattack(report, verdict)
    gamma = "" if report.get("gamma") is None else f" gamma={report['gamma']}"
    notes = [
        f"Robust accuracy on {n} test images (seed {report.get('seed')}).",
        f"Per-input worst case {_percent(worst, n)}% over the attacks "
        f"{', '.join(verdict['attacks'])}.",
    ]
    if auto is None:
        notes.append("AutoAttack was not run: autoattack_acc is null.")
    if verdict["masking_suspected"]:
        checks = ", ".join(reason.partition(":")[0] for reason in verdict["reasons"])
        notes.append(f"Gradient masking suspected ({checks}).")
    info: dict[str, Any] = {
        "name": f"{report['model']} {report['activation']}{gamma}",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": report["data"],
        "architecture": report["model"],
        "eps": eps_string(verdict["eps"]),
        "clean_acc": f"{100 * report['clean_acc']:.2f}",
        "footnote": "<br>".join(notes),
        "autoattack_acc": None if auto is None else _percent(auto, n),
    }
    if auto is None or worst < auto:
        info["external"] = _percent(worst, n)
    info["unreliable"] = verdict["masking_suspected"]
    return info


def export_robustbench(
    report_path: Path, out: Path, norm: str = "linf", eps: float | None = None
) -> dict[str, Any]:
    report = read_report(report_path)
    try:
        info = model_info(report, norm, eps)
    except (KeyError, TypeError, AttributeError) as err:
        raise KWTAError(f"{report_path} is not an attack report (bad field {err})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    return info


class _Parser(argparse.ArgumentParser):
    """Refuses bad arguments as every app refuses bad input: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="kwta-export", description=__doc__.split("\n")[0])
    modes = top.add_subparsers(dest="mode", required=True, parser_class=_Parser)
    model = modes.add_parser("model", help="a checkpoint as model.safetensors + model.json")
    model.add_argument("ckpt", type=Path, help="a checkpoint of train.py")
    model.add_argument("--out", type=Path, required=True, help="the folder to write into")
    bench = modes.add_parser("robustbench", help="an attack report as a RobustBench model_info")
    bench.add_argument("report", type=Path, help="an attack report folder or its report.json")
    bench.add_argument("--out", type=Path, required=True, help="the model_info JSON to write")
    bench.add_argument("--norm", choices=("linf", "l2"), default="linf")
    bench.add_argument("--eps", type=float, help="the radius, when the report has several")
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.mode == "model":
        print(json.dumps(export_model(args.ckpt, args.out), indent=2))
        print(f"exported: {args.out / WEIGHTS}, {args.out / INFO}")
    else:
        print(json.dumps(export_robustbench(args.report, args.out, args.norm, args.eps), indent=2))
        print(f"exported: {args.out}")
