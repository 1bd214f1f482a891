"""The ONNX Runtime backend: a bundle without build records runs its plain ONNX, and the shipped model.onnx
carries its own classes and preprocessing for other runtimes."""
from __future__ import annotations

import json

from backend_helpers import SHIPPED
from click.testing import CliRunner

from batchcls.backends import load_backend
from batchcls.backends.record import onnx_sha256, read_record
from batchcls.card import load_card
from batchcls.cli import cli


def test_a_bundle_without_build_records_runs_its_onnx(bundle):
    """A fresh clone or a wheel has no engines.json: the plain ONNX model runs."""
    card = load_card(bundle)
    assert not (bundle / "engines.json").exists() and read_record(card) == {}
    assert load_backend(card, "onnxruntime").model_path == bundle / "model.onnx"


def test_the_shipped_onnx_describes_itself_and_info_shows_it():
    """Class names, preprocessing and temperature travel inside model.onnx (metadata_props) for other runtimes."""
    from batchcls.backends.onnxruntime import onnx_metadata

    card = load_card(SHIPPED)
    assert onnx_sha256(card) == card.onnx_sha256
    meta = onnx_metadata(card.onnx_path)
    assert json.loads(meta["classes"]) == card.classes and float(meta["temperature"]) == card.temperature
    pre = json.loads(meta["preprocessing"])
    assert {k: pre[k] for k in ("input_size", "resize_mode", "crop_pct", "interpolation", "mean", "std")} == \
        {k: getattr(card, k) for k in ("input_size", "resize_mode", "crop_pct", "interpolation", "mean", "std")}
    res = CliRunner().invoke(cli, ["info", "--model", str(SHIPPED), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["onnx_metadata"] == meta
