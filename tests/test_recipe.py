"""What the recipe resolves to on the data: epochs for --min-steps, class weights, the
metric --keep best compares; explicit settings win and a resumed run keeps its record."""

from __future__ import annotations

import pytest

from lorafit.config import RunConfig
from lorafit.errors import ConfigError
from lorafit.runs import resolve_recipe


def test_small_data_gets_more_epochs_unless_epochs_is_given():
    imdb = resolve_recipe(RunConfig(), [495, 495], None)  # the embedded sample: 62 steps an epoch
    assert imdb["epochs_resolved"] == 3 and imdb["steps_per_epoch"] == 62
    assert imdb["class_weights_resolved"] is None and imdb["select_on"] == "accuracy"
    drugs = resolve_recipe(RunConfig(), [145, 48, 347], None)  # 540 reviews: 34 steps an epoch
    assert drugs["steps_per_epoch"] == 34 and drugs["epochs_resolved"] == 5  # 170 >= 150 steps
    assert drugs["select_on"] == "macro_f1" and drugs["num_labels_resolved"] == 3
    assert len(drugs["class_weights_resolved"]) == 3
    assert resolve_recipe(RunConfig(epochs=2), [145, 48, 347], None)["epochs_resolved"] == 2
    assert resolve_recipe(RunConfig(min_steps=0), [145, 48, 347], None)["epochs_resolved"] == 3
    accum = resolve_recipe(RunConfig(grad_accum=2), [145, 48, 347], None)  # 17 optimizer steps an epoch
    assert accum["steps_per_epoch"] == 17 and accum["epochs_resolved"] == 9
    assert resolve_recipe(RunConfig(class_weights="none"), [145, 48, 347], None)["class_weights_resolved"] is None
    assert resolve_recipe(RunConfig(class_weights="balanced"), [495, 495], None)["class_weights_resolved"] == [1.0, 1.0]


def test_a_resumed_run_keeps_what_it_recorded():
    recorded = {"epochs_resolved": 7, "class_weights_resolved": [0.6, 3.0], "select_on": "macro_f1",
                "num_labels_resolved": 2}
    assert resolve_recipe(RunConfig(), [495, 495], recorded)["epochs_resolved"] == 7
    assert resolve_recipe(RunConfig(), [495, 495], recorded)["class_weights_resolved"] == [0.6, 3.0]


@pytest.mark.parametrize("field, value, flag", [("class_weights", "inverse", "--class-weights"),
                                                 ("min_steps", -1, "--min-steps"), ("num_labels", 1, "--num-labels"),
                                                 ("epochs", 0, "--epochs")])
def test_recipe_flags_are_validated(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        RunConfig(**{field: value})
