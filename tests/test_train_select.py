"""Model selection on val NLL, the EMA of the weights, and resuming: real tiny trainings on samples/simpsons."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from batchcls.metrics import macro_f1
from train.train import TrainConfig, val_scores
from train.train import main as train_main

# 24 train / 8 val images at 64 px, 3 steps an epoch: about a second an epoch on 2 cores.
TINY = dict(data=str(SAMPLES), model="efficientnet_lite0", input_size=64, start_size=0, batch_size=8,
            num_workers=0, progress=False, lr=3e-3, patience=0, ema_decay=0.5)


def tiny(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / "run"), **kw})


def quiet(*_a, **_k):
    pass


def test_val_nll_prefers_the_more_accurate_model_macro_f1_does_not():
    """Two models on 40 val images, one class with only 2: A gets both rare images right but 3 common ones wrong,
    B the reverse (2 wrong, both rare). Macro-F1 picks A (a 2-image class weighs as much as a 20-image one);
    the NLL picks B, the one right on more images."""
    y = np.array([0] * 20 + [1] * 18 + [2] * 2)

    def logits(pred, conf):
        out = np.zeros((len(y), 3))
        out[np.arange(len(y)), pred] = conf
        return out
    pred_a = y.copy()
    pred_a[:3] = 1  # 3 common images wrong, the rare ones right
    pred_b = y.copy()
    pred_b[38:] = 0  # both rare images wrong, every common one right
    a, b = val_scores(logits(pred_a, 6.0), y, 3), val_scores(logits(pred_b, 6.0), y, 3)
    assert a["macro_f1"] > b["macro_f1"] and a["acc"] < b["acc"]
    assert b["nll"] < a["nll"]  # the criterion tracks accuracy here
    assert a["macro_f1"] == pytest.approx(macro_f1(y, pred_a, 3))
    # nll is at the temperature fitted on these logits, so never above the raw NLL
    assert b["nll"] <= b["nll_raw"] + 1e-9 and b["temperature"] != 1.0

    from train.pipeline import select
    rows = [{"val": a, "images_per_s": 200.0, "weights": "raw"}, {"val": b, "images_per_s": 100.0, "weights": "ema"}]
    assert select(rows)["val"] is b


def test_a_model_less_accurate_on_val_than_the_linear_probe_never_ships():
    """Fine-tuned weights with fewer right answers on validation than the probe lose to it, whatever their NLL."""
    from train.pipeline import select

    def row(weights, acc, nll):
        return {"weights": weights, "val": {"acc": acc, "nll": nll}, "images_per_s": 100.0}
    probe, sharp, better = row("probe", 0.80, 0.70), row("raw", 0.78, 0.50), row("ema", 0.82, 0.60)
    assert select([probe, sharp]) is probe
    assert select([probe, sharp, better]) is better
    assert select([probe, row("raw", 0.80, 0.65)])["weights"] == "raw"  # as accurate, lower NLL: fine-tuned
    # more right answers than the probe, though its NLL is higher (the probe's head is strongly regularised)
    assert select([row("probe", 0.651, 0.984), row("raw", 0.667, 1.025)])["weights"] == "raw"
    assert select([row("raw", 0.6, 1.0), row("ema", 0.6, 0.9)])["weights"] == "ema"  # equals: the lower NLL


def test_training_keeps_the_lowest_val_nll_of_raw_and_ema(tmp_path):
    out = tmp_path / "run"
    summary = train_main(tiny(tmp_path, epochs=3), log=quiet)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # per weights: the best file holds the epoch with the lowest NLL, and ckpt_best.pt the better of the two
    for w in ("raw", "ema"):
        nlls = [h[w]["nll"] for h in history]
        snap = torch.load(out / f"ckpt_best_{w}.pt", weights_only=False)
        assert snap["weights"] == w and snap["epoch"] == int(np.argmin(nlls))
        assert snap["best_val_nll"] == pytest.approx(min(nlls))
    best = min((h[w]["nll"], w) for h in history for w in ("raw", "ema"))
    top = torch.load(out / "ckpt_best.pt", weights_only=False)
    assert (top["best_val_nll"], top["weights"]) == pytest.approx(best) and summary["weights"] == best[1]
    assert summary["best_val_nll"] == pytest.approx(best[0])
    assert set(summary["ckpts"]) == {"raw", "ema"}


def test_ema_averages_the_trained_layers_only(tmp_path):
    train_main(tiny(tmp_path, epochs=2), log=quiet)
    ckpt = torch.load(tmp_path / "run" / "ckpt_last.pt", weights_only=False)
    raw, ema = ckpt["model"], ckpt["ema"]
    assert raw.keys() == ema.keys()
    assert torch.equal(raw["conv_stem.weight"], ema["conv_stem.weight"])  # frozen stem: nothing to average
    assert not torch.equal(raw["classifier.weight"], ema["classifier.weight"])  # trained head: EMA lags behind
    # EMA off: one set of weights, one val pass an epoch, no EMA file
    summary = train_main(tiny(tmp_path / "off", epochs=1, ema_decay=0.0), log=quiet)
    assert set(summary["ckpts"]) == {"raw"} and not (tmp_path / "off" / "run" / "ckpt_best_ema.pt").exists()


def test_resume_continues_exactly_and_a_finished_run_trains_no_more(tmp_path):
    straight = train_main(tiny(tmp_path / "a", epochs=2), log=quiet)
    cfg = tiny(tmp_path / "b", epochs=2, resume=True, epochs_this_run=1)
    logs = []
    train_main(cfg, log=logs.append)  # interrupted after epoch 1 ...
    assert "starting from the beginning" in " ".join(logs)
    resumed = train_main(replace(cfg), log=logs.append)  # ... the same command again continues with epoch 2
    assert "resuming from" in " ".join(logs)
    a = torch.load(tmp_path / "a" / "run" / "ckpt_last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "run" / "ckpt_last.pt", weights_only=False)
    assert b["finished"] and b["epoch"] == 1 and b["step"] == a["step"] == 6
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]  # the history survives the interruption
    assert [h["raw"]["nll"] for h in resumed["history"]] == pytest.approx([h["raw"]["nll"] for h in straight["history"]])
    # a third run of the same command finds the run finished: no epoch is trained, the summary is the same
    logs.clear()
    again = train_main(replace(cfg), log=logs.append)
    assert "finished run" in " ".join(logs) and not any(line.startswith("epoch ") for line in logs)
    assert again["best_val_nll"] == resumed["best_val_nll"] and again["weights"] == resumed["weights"]
    assert math.isclose(again["train_time_s"], resumed["train_time_s"])


def test_what_ships_is_set_once():
    """TrainConfig's defaults are the Lite0 recipe; the search grid contains them; Lite0 alone by default."""
    from train.pipeline import RECIPES, get_args_parser
    from train.search import GRID

    assert RECIPES["efficientnet_lite0"] == {}
    cfg = TrainConfig()
    assert all(getattr(cfg, k) in values for k, values in GRID.items())
    args = get_args_parser().parse_args(["--data", "x"])
    assert args.budget_min == 66.0 and args.models == "efficientnet_lite0" and args.export is None
