"""A model card is checked field by field at load, and against its model before any file is classified."""
import json
import shutil

import numpy as np
import pytest

from batchcls.card import check_against_model, load_card
from batchcls.errors import ModelError


def _tampered(tmp_path, colour_bundle, **changes):
    bundle = tmp_path / "tampered"
    shutil.copytree(colour_bundle, bundle)
    card = json.loads((bundle / "card.json").read_text())
    card.update(changes)
    (bundle / "card.json").write_text(json.dumps(card))
    return bundle


@pytest.mark.parametrize("changes, message", [
    ({"std": [0.5, 0.0, 0.5]}, "std values must be > 0"),
    ({"std": [0.5, 0.5]}, "std needs 3 numbers"),
    ({"mean": "grey"}, "mean needs 3 numbers"),
    ({"input_size": 0}, "input_size must be a whole number of pixels from 8 to 4096, not 0"),
    ({"input_size": "32"}, "input_size must be a whole number"),
    ({"input_size": True}, "input_size must be a whole number"),
    ({"input_size": 100000}, "input_size must be a whole number"),
    ({"classes": "red,green,blue"}, "classes must be a non-empty list of names"),
    ({"classes": ["red", 2, "blue"]}, "classes must be a non-empty list of names"),
    ({"classes": ["red", "red", "blue"]}, "classes must be unique"),
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"temperature": "warm"}, "temperature must be a number > 0"),
    ({"crop_pct": None}, "crop_pct must be a number in (0, 1]"),
    ({"resize_mode": ["squash"]}, "resize_mode ['squash'] is not one of"),
    ({"onnx": "../../model.onnx"}, "must name a file inside the bundle folder"),
    ({"onnx": 7}, "onnx must be a non-empty string"),
    ({"metrics": []}, "metrics must be a JSON object"),
])
def test_a_bad_field_is_one_line_naming_it(tmp_path, colour_bundle, changes, message):
    with pytest.raises(ModelError) as e:
        load_card(_tampered(tmp_path, colour_bundle, **changes))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_several_problems_are_one_line_each(tmp_path, colour_bundle):
    with pytest.raises(ModelError) as e:
        load_card(_tampered(tmp_path, colour_bundle, std=[0, 0, 0], input_size="big", classes=[]))
    lines = str(e.value).splitlines()
    assert "3 problems" in lines[0] and len(lines) == 4
    assert any("std" in x for x in lines[1:]) and any("input_size" in x for x in lines[1:])


def test_the_shipped_card_is_valid():
    assert load_card().num_classes == 42


class _Model:
    """Stands in for a backend whose network returns ``width`` scores (or fails on the input)."""

    def __init__(self, width, error=None):
        self.width, self.error = width, error

    def infer(self, batch):
        if self.error:
            raise self.error
        return np.zeros((len(batch), self.width), np.float32)


def test_the_output_width_must_match_the_classes(tmp_path, colour_bundle):
    from batchcls.backends import load_backend

    ten = load_card(_tampered(tmp_path, colour_bundle, classes=[f"c{i}" for i in range(10)]))
    with pytest.raises(ModelError, match="outputs 3 scores but its card lists 10 classes"):
        check_against_model(ten, load_backend(ten, "onnxruntime"))
    right = load_card(colour_bundle)
    check_against_model(right, load_backend(right, "onnxruntime"))  # the real 3-class model passes
    with pytest.raises(ModelError, match="does not take the card's 32x32 input"):
        check_against_model(right, _Model(3, RuntimeError("Got invalid dimensions for input")))
    with pytest.raises(ModelError, match="returns shape"):
        check_against_model(right, _Flat())


class _Flat:
    def infer(self, batch):
        return np.zeros(3, np.float32)  # not (batch, classes)
