"""The config's values, checked before any work starts: one rule per key name, wherever the key
sits (``steps`` is a count in every config that has one), so a new config needs no new rule; a
rule under a whole path (``callbacks.periodic_checkpoint.steps``) takes precedence.

The names (config groups, keys) are checked by ``overrides.py`` and Hydra; Lightning, torch and
the data module check values only once the work has begun, with a traceback. These rules catch
the values a user types.
"""

from collections.abc import Callable, Iterator
from numbers import Real
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kwta_lightning.errors import ConfigError

Rule = tuple[Callable[[Any], bool], str]


def _required(key: str) -> None:
    """``key: ${required:key}``: a value the user must give. OmegaConf's own ``???``
    cannot say so in a recipe: merged onto a default (``init_from: null``) it loses to it."""
    raise ConfigError(f"{key} is required: give it on the command line ({key}=...)")


KWTA_IMPLS = {"kernel": "", "torch": "_torch", "topk": "_topk"}  # -> names in core.activations


def _channel(per_channel: Any) -> str:
    if not isinstance(per_channel, bool):
        raise ConfigError(f"act.per_channel={per_channel}: must be true or false")
    return "_channel" if per_channel else ""


def _kwta_activation(per_channel: Any, impl: Any) -> str:
    """``act.name`` of ``conf/act/kwta.yaml``: the registered k-WTA layer of its two fields."""
    channel = _channel(per_channel)
    if impl not in KWTA_IMPLS:
        raise ConfigError(f"act.impl={impl}: must be one of {', '.join(KWTA_IMPLS)}")
    return "kwta" + channel + KWTA_IMPLS[impl]


def _kwta_fixed_activation(per_channel: Any) -> str:
    """``act.name`` of ``conf/act/kwta_fixed.yaml``."""
    return "kwta" + _channel(per_channel) + "_fixed"


OmegaConf.register_new_resolver("required", _required, replace=True)
OmegaConf.register_new_resolver("kwta_activation", _kwta_activation, replace=True)
OmegaConf.register_new_resolver("kwta_fixed_activation", _kwta_fixed_activation, replace=True)


def _number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def count(low: int) -> Rule:
    return (lambda v: _integer(v) and v >= low), f"an integer >= {low}"


def number(low: float, high: float | None = None, open_low: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        if not _number(v):
            return False
        return (v > low if open_low else v >= low) and (high is None or v <= high)

    bounds = f"> {low:g}" if open_low else f">= {low:g}"
    return ok, f"a number {bounds}" + ("" if high is None else f" and <= {high:g}")


def or_null(rule: Rule) -> Rule:
    check, text = rule
    return (lambda v: v is None or check(v)), f"null or {text}"


def one_or_list(rule: Rule) -> Rule:
    """A value, a list of values, or null (the defaults of the data set)."""
    check, text = rule

    def ok(v: Any) -> bool:
        return v is None or check(v) or (isinstance(v, list) and bool(v) and all(map(check, v)))

    return ok, f"{text}, a list of them, or null"


BOOLEAN: Rule = (lambda v: isinstance(v, bool), "true or false")
INTEGER: Rule = (_integer, "an integer")
SHARE: Rule = number(0.0, 1.0)
# The Trainer's precisions (Lightning's _PRECISION_INPUT, pinned by a test): written out, as
# importing Lightning takes seconds and the checks must answer at once
PRECISIONS = ("64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "64", "32")
PRECISIONS += ("16", "bf16", "transformer-engine", "transformer-engine-float16", 64, 32, 16)
PRECISION_NAMES = ", ".join(dict.fromkeys(map(str, PRECISIONS)))
# core.module's ADV_TRAIN_METHODS (pinned by a test), written out for the same reason
ADV_TRAIN_METHODS = ("pgd", "trades", "free")

RULES: dict[str, Rule] = {
    "seed": INTEGER,
    "act.options.k": count(1),
    "act.options.k_inference_factor": number(1.0),
    "act.options.boost_strength": number(0.0),
    "act.options.boost_strength_factor": number(0.0, 1.0, open_low=True),
    "act.options.duty_cycle_period": count(1),
    "act.options.local": BOOLEAN,
    "act.options.break_ties": BOOLEAN,
    "gamma": number(0.0, 1.0, open_low=True),
    "gamma_start": number(0.0, 1.0, open_low=True),
    "gamma_end": number(0.0, 1.0, open_low=True),
    "lr": number(0.0, open_low=True),
    "momentum": number(0.0, 1.0),
    "weight_decay": number(0.0),
    "max_epochs": count(1),
    "batch_size": count(1),
    "num_workers": count(0),
    "train_subset": or_null(count(1)),
    "val_subset": or_null(count(1)),
    "test_subset": or_null(count(1)),
    "log_every_n_steps": count(1),
    "every_n_steps": count(1),
    "check_val_every_n_epoch": count(1),
    "precision": ((lambda v: v in PRECISIONS), f"one of {PRECISION_NAMES}"),
    "steps": count(1),
    "callbacks.periodic_checkpoint.steps": or_null(count(1)),
    "restarts": count(1),
    "n_queries": count(1),
    "minutes": or_null(number(0.0, open_low=True)),
    "eps": one_or_list(number(0.0)),
    "l2_eps": one_or_list(number(0.0)),
    "path_eps": number(0.0, open_low=True),
    "step_size": number(0.0, open_low=True),
    "rel_stepsize": number(0.0, open_low=True),
    "sigma": number(0.0, open_low=True),
    "mix": SHARE,
    "adv_train.method": (
        (lambda v: v in ADV_TRAIN_METHODS),
        f"one of {', '.join(ADV_TRAIN_METHODS)}",
    ),
    "adv_train.beta": number(0.0, open_low=True),
    "replays": count(1),
    "tolerance": SHARE,
    "n_samples": count(1),
    "n_inputs": count(1),
    "n_examples": count(0),
    "width": count(1),
    "n_points": count(2),
    "grid_points": count(2),
    "path_steps": count(2),
    "convergence_doublings": count(0),
    "unbounded_steps": count(1),
    **{
        key: BOOLEAN
        for key in (
            "enabled",
            "pretrained",
            "resume",
            "test",
            "download",
            "augment",
            "on_device",
            "random_start",
            "small_input",
            "compile",
        )
    },
}


def _leaves(node: DictConfig, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every value set in ``node`` itself, resolved; a key that only refers to another (``model.
    optimizer: ${optimizer}``) is skipped, so each value is checked under the key a user sets."""
    for key in node:
        if OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            continue
        where = f"{path}.{key}" if path else str(key)
        if OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            yield from _leaves(value, where)
        else:
            yield where, OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


def check_values(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value breaks its rule (Hydra's own settings
    and values still missing, ``???``, are left to Hydra)."""
    top = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for path, value in _leaves(top):
        rule = RULES.get(path) or RULES.get(path.rpartition(".")[2])
        if rule is not None and not rule[0](value):
            shown = "null" if value is None else value
            raise ConfigError(f"{path}={shown}: must be {rule[1]}")
