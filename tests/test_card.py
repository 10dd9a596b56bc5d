"""The README's results and the model card's figures are generated from model.json and kept in step with it."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from tumor_xai import card


def _meta(**metrics) -> dict:
    return {
        "arch": "resnet18",
        "preprocessing": {"input_size": 224},
        "training": {"epochs": 5, "aug": "strong", "cam_loss_weight": 1.0},
        "calibration": {"temperature": 0.7, "n": 10},
        "screening": {"threshold": 0.5, "target_sensitivity": 0.995},
        "metrics": metrics,
    }


def test_bars_are_met_missed_or_unknown():
    meta = _meta(
        official={
            "accuracy": 0.997,
            "tumor_sensitivity_argmax": 0.99,
            "ece": 0.01,
            "recall": {"a": 0.98, "notumor": 0.995},
        },
        stress={"noise_0.05": 0.975, "downup_4x": 0.96},
    )
    rows = {label: (value, met) for label, _, value, met in card.bar_rows(meta)}
    assert rows["accuracy (official Testing)"] == ("99.70 %", True)
    assert rows["tumour sensitivity at the argmax"][1] is False
    assert rows["no-tumour recall"] == ("99.50 %", True)
    assert rows["lowest class recall"] == ("98.00 %", False)  # a tumour class can miss on its own
    assert rows["expected calibration error"][1] is True  # a bar the figure must stay under
    assert rows["lowest stress-test accuracy"] == ("96.00 %", False)
    assert rows["accuracy (duplicate-free subset)"] == ("-", None)  # not measured is not "met"


def test_sections_are_replaced_between_their_markers_only():
    text = "intro\n<!-- section:results -->\nold\n<!-- /section:results -->\noutro\n"
    assert card.replace_section(text, "results", "new") == (
        "intro\n<!-- section:results -->\nnew\n<!-- /section:results -->\noutro\n"
    )
    with pytest.raises(ValueError, match="markers"):
        card.replace_section("no markers", "results", "x")


def test_check_flags_a_stale_readme_and_writing_fixes_it(tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "model.json").write_text(json.dumps(_meta(official={"n": 3, "accuracy": 1.0})))
    (weights / "MODEL_CARD.md").write_text("# card\n<!-- card:figures -->\n<!-- /card:figures -->\n")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- section:results -->\nold figures\n<!-- /section:results -->\n")
    args = ["--weights", str(weights), "--readme", str(readme)]
    assert card.main([*args, "--check"]) == 1
    assert card.main(args) == 0 and card.main([*args, "--check"]) == 0
    assert "100.00 %" in readme.read_text() and "## Figures" in (weights / "MODEL_CARD.md").read_text()


def test_the_repository_readme_and_model_card_match_the_shipped_weights():
    assert card.main(["--check"]) == 0, "run `python -m tumor_xai.card` after changing weights/model.json"
    assert (REPO / "weights" / "MODEL_CARD.md").is_file()


def test_other_collections_are_tabled_with_their_bars_and_absent_when_not_measured():
    assert card.collections_lines(_meta(official={"accuracy": 0.99})) == []
    sets = {
        "br35h-tumour-dev": {
            "n": 201,
            "tumour_sensitivity_argmax": 0.92,
            "tumour_sensitivity_flag": 0.90,
            "notumor_probability_on_tumours": {"q50": 0.1, "q90": 0.8},
            "heatmap": {"pointing": 0.7, "mass_in_mask": 0.3},
        },
    }
    text = "\n".join(card.collections_lines(_meta(external=sets, external_evaluated_with="cmd")))
    assert "| br35h-tumour-dev | 201 | 92.0 % | 90.0 % |" in text
    assert "| br35h-tumour-dev: tumour sensitivity (argmax) | >= 90 % | 92.0 % | yes |" in text
    assert "| br35h-tumour-dev: tumour sensitivity (screening flag) | >= 95 % | 90.0 % | **no** |" in text
    assert "| br35h-tumour-dev: default heatmap: pointing game | >= 60 % | 70.0 % | yes |" in text
    assert "| tcia-slices: class accuracy (glioma) | >= 70 % | - | - |" in text  # a set not measured is no verdict


def test_an_ensemble_is_described_member_by_member():
    meta = _meta()
    meta["ensemble"] = {
        "members": [
            {"training": {"epochs": 60, "aug": "basic"}, "training_cost": {"hours": 1.5, "hardware": "2 CPU cores"}},
            {"training": {"time_budget": 240.0, "low_res_size": 128, "device": "cuda", "lesion_paste": 0.5}},
        ]
    }
    line = card._training_line(meta)
    assert line.startswith("an ensemble of 2 resnet18 networks at 224 px run as one (logits averaged")
    assert "(1) 60 epochs with `--aug basic`; about 1.5 h in all on 2 CPU cores" in line
    assert "(2) 4 min of training, 128-160 px then 224 px on one GPU with" in line and "`--lesion-paste 0.5`" in line


def test_a_retrained_classifier_is_named_after_the_network():
    meta = _meta()
    meta["head_retraining"] = {"n_features": 26227, "passes": 4, "chosen_anchor": 1.0}
    line = card._training_line(meta)
    assert line.startswith("resnet18 at 224 px, trained from scratch")
    assert "refitted on the frozen network's features" in line and "26227 vectors from 4 augmented passes" in line
    assert (
        "`python -m tumor_xai.retrain_head`, pull towards the previous classifier 1, chosen on the validation" in line
    )
    assert "max pooled" not in line
    meta["pooling"] = "avgmax"
    assert "refitted on the frozen network's average and max pooled (each channel's" in card._training_line(meta)
    assert "--pooling avgmax" not in card._recipe(meta["training"])
    assert "maximum (`--pooling avgmax`)" in card._recipe({**meta["training"], "pooling": "avgmax"})


def test_the_calibration_line_names_its_criterion_when_the_weights_record_one():
    plain = card._headline(_meta())[0]
    assert plain.endswith("T = 0.700.") and "NLL" not in plain
    meta = _meta()
    meta["calibration"].update(criterion="mean top-class confidence equals accuracy", nll_temperature=0.95)
    line = card._headline(meta)[0]
    assert "T = 0.700, the temperature at which mean top-class confidence equals accuracy" in line
    assert "NLL's would be 0.950" in line
