"""Attacks, their evaluation and the diagnostics, on small models trained here in a second.

The data: 12x12 grey images of ten classes, class c a 3x3 patch of 0.6 at the c-th of ten places,
on noise below 0.15. An MLP learns it perfectly; the attacks must then move pixels by about 0.25 to
erase or forge a patch.
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import nn

from kwta_lightning.attacks.adaptive import NESPGD, BPDALayer, replace_kwta
from kwta_lightning.attacks.base import AttackResult, margin_loss, perturbation_norms
from kwta_lightning.attacks.diagnostics import (
    Counts,
    deepfool_at_eps,
    iterative_beats_single_step,
    run_diagnostics,
    verdict,
)
from kwta_lightning.attacks.evaluate import Evaluator, ProgressLog, evaluate, result_rows
from kwta_lightning.attacks.pgd import PGD
from kwta_lightning.attacks.report import training_run
from kwta_lightning.core.activations import KWTA, kwta_layerwise
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.loggers import wandb_logger

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# Every attack config, cut to a few steps and queries so the whole set runs in seconds.
TINY_ATTACKS = [
    "attack.pgd.steps=10",
    "attack.pgd.restarts=1",
    "attack.apgd_ce.steps=10",
    "attack.apgd_dlr.steps=10",
    "attack.deepfool.attack.steps=5",
    "attack.deepfool_l2.attack.steps=5",
    "attack.vga.steps=5",
    "attack.cw.attack.binary_search_steps=2",
    "attack.cw.attack.steps=20",
    "attack.l2_pgd.attack.steps=10",
    "attack.l2_pgd.attack.rel_stepsize=0.1",
    "attack.hsj.attack.steps=2",
    "attack.hsj.attack.initial_gradient_eval_steps=10",
    "attack.hsj.attack.max_gradient_eval_steps=20",
    "attack.nes_pgd.steps=10",
    "attack.nes_pgd.samples=10",
    "attack.nes_pgd.rel_stepsize=0.25",
    "attack.bpda.attack.steps=10",
    "attack.bpda.temperatures=[0.1,0.5]",
    "attack.bpda_relu.attack.steps=10",
    "attack.transfer.attack.steps=10",
    "attack.transfer.attack.rel_stepsize=0.1",
    "attack.square.n_queries=20",
    "attack.mim.steps=5",
    "attack.cw_linf.attack.binary_search_steps=2",
    "attack.boundary.attack.steps=100",
    "attack.single_pixel.max_pixels=30",
    "attack.local_search.rounds=3",
    "attack.local_search.max_locations=16",
]


def patches(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=generator)
    x = 0.15 * torch.rand(n, 1, 12, 12, generator=generator)
    for i, c in enumerate(y.tolist()):
        row, col = divmod(c, 4)
        x[i, 0, 4 * row : 4 * row + 3, 3 * col : 3 * col + 3] = 0.6
    return x, y


def trained(activation: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 64), activation, nn.Linear(64, 10))
    x, y = patches(512, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def relu_net() -> nn.Module:
    return trained(nn.ReLU())


@pytest.fixture(scope="module")
def kwta_net() -> nn.Module:
    return trained(KWTA(0.2))


def compose_attacks(overrides: list[str], names: str | None = None):
    """conf/attack.yaml's attacks (``names``: a comma-separated choice), cut to TINY_ATTACKS."""
    if names is not None:
        chosen = names.split(",")
        tiny = [o for o in TINY_ATTACKS if o.split(".")[1] in chosen]
        overrides = [f"attack=[{names}]", *tiny, *overrides]
    else:
        overrides = [*TINY_ATTACKS, *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("attack", overrides=["ckpt_path=unused", *overrides])
    return {name: instantiate(node, name=name) for name, node in cfg.attack.items()}


def test_the_test_models_learn_the_patches(relu_net, kwta_net):
    x, y = patches(64)
    for model in (relu_net, kwta_net):
        assert (model(x).argmax(1) == y).float().mean() == 1.0


def test_every_attack_stays_in_bounds_and_worst_case_is_below_each(relu_net):
    every = sorted(p.stem for p in (ROOT / "conf" / "attack").glob("*.yaml"))
    attacks = compose_attacks([], ",".join(every))
    assert len(attacks) == len(every) == 21
    x, y = patches(16)
    epsilons = {"linf": [0.0, 0.3], "l2": [0.0, 2.0]}
    for attack in attacks.values():
        for eps, out in zip(
            epsilons[attack.norm], attack.run(relu_net, x, y, epsilons[attack.norm]), strict=True
        ):
            assert out.x_adv.shape == x.shape, attack.name
            assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1, attack.name
            assert perturbation_norms(out.x_adv, x, attack.norm).max() <= eps + 1e-5, attack.name

    evaluation = evaluate(relu_net, x, y, attacks, epsilons, batch_size=8, device=CPU)
    rows = result_rows(evaluation.results, evaluation.clean_correct, {})
    clean = evaluation.clean_correct.float().mean().item()
    for row in rows:
        if row["eps"] == 0:
            assert row["robust_acc"] == clean, row["attack"]
    worst = verdict(evaluation.results, evaluation.clean_correct, [])
    for v in worst:  # per input: robust in the worst case only if robust under every attack
        for r in evaluation.results:
            if (r.norm, r.eps) == (v["norm"], v["eps"]):
                assert v["n_robust"] <= int(r.robust.sum()), r.attack
        here = [r.robust for r in evaluation.results if (r.norm, r.eps) == (v["norm"], v["eps"])]
        assert v["n_robust"] == int(torch.stack(here).all(0).sum())
        # images_per_s: the inputs attacked at that eps over that eps's (rounded) wall time
        assert row["images_per_s"] > 0, row["attack"]
        seconds = len(x) / row["images_per_s"]
        assert seconds == pytest.approx(row["wall_time_s"], rel=1e-3, abs=0.01), row["attack"]
    # DeepFool runs once for both eps, so both its rows carry that run's time.
    assert len({r["images_per_s"] for r in rows if r["attack"] == "deepfool"}) == 1
    # The plain net falls to white-box PGD at eps 0.3, and VGA reports its targeted rate.
    pgd = next(r for r in rows if r["attack"] == "pgd" and r["eps"] == 0.3)
    assert pgd["robust_acc"] == 0.0 and pgd["success_rate"] == 1.0
    vga = next(r for r in rows if r["attack"] == "vga" and r["eps"] == 0.3)
    assert 0 < vga["targeted_success_rate"] <= 1


def test_unknown_norm_and_reduced_autoattack_are_refused():
    with pytest.raises(Exception, match="norm must be one of linf, l2"):
        compose_attacks(["attack.fgsm.norm=l3"], "fgsm")
    with pytest.raises(Exception, match="a reduced AutoAttack is not AutoAttack"):
        compose_attacks(["attack.autoattack.version=custom"], "autoattack")


@pytest.mark.parametrize("inplace", [False, True])  # torchvision's swapped ReLUs are in place
@pytest.mark.parametrize("surrogate", ["relu", "soft_kwta"])
def test_bpda_forward_is_kwta_and_backward_is_the_surrogate(surrogate, inplace):
    torch.manual_seed(0)
    x = torch.randn(4, 20, requires_grad=True)
    layer = BPDALayer(KWTA(0.2, inplace=inplace), surrogate, temperature=0.1)
    out = layer(x * 1)
    assert torch.equal(out, kwta_layerwise(x, 0.2))
    (grad,) = torch.autograd.grad(out.sum(), x)
    if surrogate == "relu":
        assert torch.equal(grad, (x > 0).float())
    else:  # a smooth mask: every unit passes some gradient, winners the most
        assert (grad != 0).all()
        winners = kwta_layerwise(x, 0.2) != 0
        assert grad[winners].mean() > grad[~winners].abs().mean()


def test_replace_kwta_swaps_every_kwta_layer_on_a_copy(kwta_net):
    relu = replace_kwta(kwta_net, lambda _: nn.ReLU())
    assert isinstance(relu[2], nn.ReLU) and isinstance(kwta_net[2], KWTA)


def test_the_training_run_of_a_checkpoint_names_its_wandb_run(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("logger:\n  wandb:\n    project: p\n")
    logger = wandb_logger(save_dir=str(tmp_path), project="p", mode="disabled")
    info = training_run(tmp_path / "checkpoints" / "best.ckpt")
    assert info["wandb_project"] == "p"
    assert info["wandb_id"] == logger.version


def test_nes_gradient_estimate_points_along_the_true_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(2, 1, 4, 4) * 0.5 + 0.25, torch.tensor([0, 1])
    attack = NESPGD(samples=4000, sigma=0.01, chunk=500)
    attack.generator = torch.Generator().manual_seed(0)
    estimate, _ = attack.gradient(model, x, y, step=0)
    x_grad = x.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(margin_loss(model(x_grad), y).sum(), x_grad)
    cosine = nn.functional.cosine_similarity(estimate.flatten(1), true.flatten(1))
    assert (cosine > 0.9).all(), cosine


def test_nes_draws_each_phases_samples_per_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    with torch.no_grad():  # always class 0: never fooled, every step runs
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([9.0, 0.0, 0.0]))
    batches = []
    model.register_forward_hook(lambda _m, inputs, _out: batches.append(len(inputs[0])))
    attack = NESPGD(samples=[4, 8, 16], steps=4, decay_at=[0.5, 0.75], chunk=100)
    attack.attack(model, torch.rand(3, 1, 4, 4), torch.zeros(3, dtype=torch.long), eps=0.1)
    probes = [b for b in batches if b != 3]  # leave out the predictions at x itself
    assert probes == [4 * 3, 4 * 3, 8 * 3, 16 * 3]  # steps 0-1, step 2, step 3; 3 inputs


def test_nes_refuses_a_sample_schedule_that_does_not_fit_its_steps():
    with pytest.raises(ConfigError, match=r"samples must be 3 counts >= 2 .* got \[100, 1000\]"):
        NESPGD(samples=[100, 1000], name="nes_pgd")


def diagnose(model: nn.Module, attack_names: str, eps: float = 0.3, n: int = 16):
    """Statuses of the diagnostics, and the verdict at eps."""
    attacks = compose_attacks([], attack_names)
    x, y = patches(n)
    evaluator = Evaluator(model, x, y, batch_size=n, device=CPU)
    for attack in attacks.values():
        evaluator.evaluation.results += evaluator.run(attack, [0.0, eps])
    found, extra, _ = run_diagnostics(evaluator, attacks, {}, 10, 0.01, 20, 2, 1e-8, 0.05)
    results = evaluator.evaluation.results + extra
    (at_eps,) = [
        v for v in verdict(results, evaluator.evaluation.clean_correct, found) if v["eps"] == eps
    ]
    return {d.name: d.status for d in found}, at_eps, results


class HardStep(nn.Module):
    """Rounds pixels to 0 or 1: the forward pass barely changes, the gradient is zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.round()


def test_diagnostics_stay_quiet_on_a_plain_relu_net(relu_net):
    statuses, at_eps, _ = diagnose(relu_net, "pgd,fgsm,deepfool,square,apgd_dlr")
    assert {"unbounded_eps", "vanishing_gradient", "pgd_vs_fgsm/eps=0.3"} <= statuses.keys()
    assert "autoattack_checks" not in statuses
    assert {"white_box_vs_adaptive/linf/eps=0.3", "pgd_convergence/eps=0.3"} <= statuses.keys()
    assert set(statuses.values()) == {"pass"}, statuses
    assert at_eps["masking_suspected"] is False and at_eps["reasons"] == []


def test_diagnostics_fire_on_a_model_that_masks_its_gradient(relu_net):
    masked = nn.Sequential(HardStep(), relu_net).eval()
    statuses, at_eps, results = diagnose(masked, "pgd,fgsm,square,apgd_dlr")
    assert statuses["unbounded_eps"] == "warn"
    assert statuses["autoattack_checks"] == "warn"  # the reference APGD-DLR's zero-gradient check
    assert statuses["vanishing_gradient"] == "warn"
    assert statuses["white_box_vs_adaptive/linf/eps=0.3"] == "warn"  # Square beats PGD
    assert at_eps["masking_suspected"] is True
    assert any(r.startswith("white_box_vs_adaptive") for r in at_eps["reasons"])
    assert any(r.startswith("autoattack_checks: there are") for r in at_eps["reasons"])
    pgd = next(r for r in results if r.attack == "pgd" and r.eps == 0.3)
    assert at_eps["n_robust"] < int(pgd.robust.sum())  # the worst case is below PGD's


def _result(name: str, robust: list[bool], eps: float = 0.1, kind: str = "gradient"):
    n = len(robust)
    return AttackResult(
        name,
        "linf",
        kind,
        eps,
        torch.tensor(robust),
        torch.full((n,), eps),
        {},
        1.0,
        torch.zeros(0),
        torch.zeros(0),
    )


def test_a_one_input_difference_passes_and_two_warn():
    # 1 of 25 inputs vs 2 of 25: 0.04 vs 0.08 is above tolerance 0.01 but only one input apart
    pgd, fgsm = [True] * 2 + [False] * 23, [True] + [False] * 24
    (check,) = iterative_beats_single_step(
        [_result("pgd", pgd), _result("fgsm", fgsm)], Counts(25, 0.01)
    )
    assert check.status == "pass"
    (check,) = iterative_beats_single_step(
        [_result("pgd", [True] * 3 + [False] * 22), _result("fgsm", fgsm)], Counts(25, 0.01)
    )
    assert check.status == "warn"


def test_deepfool_successes_at_eps_are_a_masking_signature():
    clean = torch.ones(4, dtype=torch.bool)
    at_edge = _result("deepfool", [False] * 4)
    (check,) = deepfool_at_eps([at_edge], clean)
    assert check.status == "warn"
    inside = _result("deepfool", [False] * 4)
    inside.norms = torch.tensor([0.05, 0.06, 0.07, 0.1])
    (check,) = deepfool_at_eps([inside], clean)
    assert check.status == "pass"


def test_pgd_step_halves_at_each_decay_point():
    pgd = PGD(steps=100, rel_stepsize=0.25, decay_at=(0.5, 0.75))
    sizes = [pgd.step_size(step, eps=0.1) for step in (0, 49, 50, 74, 75, 99)]
    assert sizes == pytest.approx([0.025, 0.025, 0.0125, 0.0125, 0.00625, 0.00625])


def test_pgd_restarts_attack_only_the_inputs_still_robust(relu_net):
    x, y = patches(32)
    calls = []
    pgd = PGD(steps=3, restarts=3, rel_stepsize=0.2, decay_at=())
    run = pgd._single_run
    pgd._single_run = lambda model, xs, ys, eps: calls.append(len(xs)) or run(model, xs, ys, eps)
    x_adv = pgd.attack(relu_net, x, y, eps=0.3).x_adv
    assert calls[0] == 32 and all(a >= b for a, b in zip(calls, calls[1:], strict=False))
    assert calls[-1] < 32, calls
    fooled = relu_net(x_adv).argmax(1) != y
    assert fooled.sum() >= 32 - calls[-1]  # every input a restart fooled keeps its fooling iterate


def timed_result(seconds: float) -> AttackResult:
    """A finished PGD run of ``seconds`` on 4 inputs."""
    none = torch.zeros(0)
    robust = torch.ones(4, dtype=torch.bool)
    return AttackResult("pgd", "linf", "gradient", 0.1, robust, none, {}, seconds, none, none)


def test_time_left_goes_by_the_attacks_run_not_those_reused(caplog):
    progress = ProgressLog(total=4)
    with caplog.at_level("INFO", logger="kwta_lightning.attacks.evaluate"):
        progress.finished([timed_result(0.0)], reused=True)
        progress.finished([timed_result(120.0)])
        progress.finished([timed_result(60.0)])
        progress.finished([timed_result(30.0)])
    ends = [record.getMessage().rpartition("elapsed, ")[2] for record in caplog.records]
    assert ends == [
        "time left unknown until an attack has run",
        "about 4m00s left",  # 2 to go at 120 s each
        "about 1m30s left",  # 1 to go at (120 + 60) / 2
        "done",
    ]


def test_time_left_leaves_out_the_runs_known_to_be_cached(caplog):
    progress = ProgressLog(total=4, cached=2)
    with caplog.at_level("INFO", logger="kwta_lightning.attacks.evaluate"):
        progress.finished([timed_result(600.0)])
        progress.finished([timed_result(60.0)])
        progress.finished([timed_result(0.0)], reused=True)
        progress.finished([timed_result(0.0)], reused=True)
    ends = [record.getMessage().rpartition("elapsed, ")[2] for record in caplog.records]
    assert ends == [
        "about 10m00s left",  # 3 to go, 2 of them cached
        "the rest from the cache",
        "the rest from the cache",
        "done",
    ]


class CountingPasses(nn.Module):
    """A model that counts the forward-backward passes per input made through it (a forward
    without gradients counts a third, as ``Attack.passes`` counts it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.passes = model, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += len(x) * (1.0 if torch.is_grad_enabled() else 1 / 3)
        return self.model(x)


def test_each_budget_is_the_work_the_attack_does(kwta_net):
    # BPDA and transfer attack copies of the model: their budget is their inner attack's
    names = "pgd,fgsm,deepfool,apgd_ce,apgd_dlr,nes_pgd,square,autoattack,l2_pgd,deepfool_l2,cw"
    names += ",mim,cw_linf,boundary,single_pixel,local_search"
    x, y = patches(8)
    for name, attack in compose_attacks([], names).items():
        counted = CountingPasses(kwta_net).eval()
        attack.run(counted, x, y, [0.01 if attack.norm == "linf" else 0.05])  # little is fooled
        assert 0.5 <= counted.passes / len(x) / attack.passes() <= 1.5, name
