"""benchmarks/activation_overhead.py in a tiny configuration: it runs and writes its JSON."""

import importlib.util
import json

import pytest
import torch

from kwta_lightning.core.activations import kwta_layerwise_topk
from tests.helpers import ROOT


def load_script(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_script("activation_overhead")
TINY = ["--backbone", "cnn", "--batch-size", "4", "--repeats", "2", "--warmup", "0"]
TINY += ["--threads", "1"]
LABELS = ["relu", "kwta g=0.5", "kwta g=0.25", "kwta_torch g=0.5", "kwta_topk g=0.5", "paper g=0.5"]


def test_step_mode_prints_the_table_and_writes_json(tmp_path, capsys):
    out = bench.main([*TINY, "--gamma", "0.5", "0.25", "--out", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert "cnn, step, batch 4, cpu" in printed and "paper g=0.5" in printed
    report = json.loads(out.read_text())
    assert report["mode"] == "step" and report["device"] == "cpu" and report["threads"] == 1
    summary = report["backbones"]["cnn"]["summary"]
    assert list(summary) == LABELS
    assert summary["relu"]["train_s_ratio"] == summary["relu"]["infer_s_ratio"] == 1.0
    for label, runs in report["backbones"]["cnn"]["runs"].items():
        assert len(runs["train_s"]) == len(runs["infer_s"]) == 2
        assert summary[label]["peak_train_mib"] > 0


@pytest.mark.slow
def test_epoch_mode_times_a_real_pass_over_data(tmp_path):
    args = ["--epoch", "--data", "fake", "--train-subset", "8", "--test-subset", "8"]
    out = bench.main([*TINY, *args, "--gamma", "0.5", "0.25", "--out", str(tmp_path / "e.json")])
    report = json.loads(out.read_text())
    assert report["mode"] == "epoch"
    assert list(report["backbones"]["cnn"]["summary"]) == LABELS


def test_paper_forward_equals_the_reference_on_distinct_values():
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    for gamma in (0.1, 0.5):
        torch.testing.assert_close(bench.PaperKWTA(gamma)(x), kwta_layerwise_topk(x, gamma))


def test_live_tensor_bytes_tracks_the_peak():
    x = torch.ones(1000)
    with bench.LiveTensorBytes() as tracker:
        a = x * 2  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        c = b + 1  # 8000 live again
        del b, c
    assert tracker.peak == 8000 and tracker.now == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--gamma", "1.5"], "gamma must lie in (0, 1], got 1.5"),
        (["--backbone", "resnet19"], "unknown model 'resnet19'"),
        (["--device", "nodevice"], "--device nodevice:"),
        (["--epoch", "--data", "nodata"], "--data nodata:"),
    ],
)
def test_bad_input_exits_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*args, "--out", "/nonexistent/never.json"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {message}")


@pytest.mark.slow
def test_lightning_overhead_compares_both_loops_on_the_same_epoch(capsys):
    overhead = load_script("lightning_overhead")
    result = overhead.main(["data.train_subset=16", "data.batch_size=8", "--repeats", "1"])
    assert result["images_per_epoch"] == 16
    assert result["plain_images_per_s"] > 0 and result["lightning_images_per_s"] > 0
    assert "plain loop" in capsys.readouterr().out
    on_device = ["data.train_subset=16", "data.batch_size=8", "data.on_device=true"]
    assert overhead.main([*on_device, "--repeats", "1"])["images_per_epoch"] == 16
    with pytest.raises(SystemExit) as exit_info:
        overhead.main(["trainer.precision=16-mixed"])
    assert exit_info.value.code == 2
    assert "trainer.precision must be one of 32-true, bf16-mixed" in capsys.readouterr().err


def test_selection_candidates_find_the_exact_kth_largest(capsys):
    selection = load_script("kwta_selection")
    gen = torch.Generator().manual_seed(0)
    tied = torch.randint(-4, 5, (3, 500), generator=gen).float()  # ties, negatives, zeros
    spread = torch.randn(3, 500, generator=gen) * 1e3
    for x in (tied, spread):
        for k in (1, 7, 250, 499, 500):
            expected = x.sort(dim=1, descending=True).values[:, k - 1]
            for name, fn in selection.CANDIDATES.items():
                torch.testing.assert_close(fn(x, k), expected, rtol=0, atol=0, msg=name)
    results = selection.main(["--sizes", "300", "--gammas", "0.1", "--batch-size", "2"])
    assert list(results["2x300 gamma=0.1"]) == ["relu", *selection.CANDIDATES]
    assert "k-th largest per row" in capsys.readouterr().out
