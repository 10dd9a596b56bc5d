"""Weights round-trip and every way a weights folder can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_weights

from tumor_xai.checkpoint import METADATA_FILE, WEIGHTS_FILE, WeightsError, load_weights, save_weights
from tumor_xai.model import build_model


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 4).eval()
    x = torch.randn(2, 1, 64, 64)
    save_weights(
        model,
        tmp_path,
        {"arch": "resnet_tiny", "class_names": list("abcd"), "preprocessing": {"input_size": 64}},
        extras={"ood.mean": torch.ones(3)},
    )
    loaded = load_weights(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.class_names == list("abcd")
    assert torch.equal(loaded.extras["ood.mean"], torch.ones(3))
    assert not loaded.model.training
    assert not list(tmp_path.glob("*.tmp")), "temporary files must not be left behind"


def test_half_storage_is_upcast_and_close(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 4).eval()
    precision = torch.full((3, 3), 1e6)  # beyond float16's range
    save_weights(
        model,
        tmp_path,
        {"arch": "resnet_tiny", "class_names": list("abcd"), "preprocessing": {}},
        extras={"ood.precision": precision},
        half=True,
    )
    loaded = load_weights(tmp_path)
    assert torch.equal(loaded.extras["ood.precision"], precision), "extras must stay float32"
    assert json.loads((tmp_path / METADATA_FILE).read_text())["storage_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.model(x), atol=5e-2)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(WeightsError, match="No weights folder"):
        load_weights(tmp_path / "absent")
    w = make_weights(tmp_path / "w")
    (w / WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsError, match="model.safetensors is missing.*Retrain"):
        load_weights(w)


def test_truncated_weights_fail_checksum(tmp_path):
    w = make_weights(tmp_path / "w")
    data = (w / WEIGHTS_FILE).read_bytes()
    (w / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="checksum"):
        load_weights(w)


def test_corrupt_weights_with_matching_checksum_fail_clearly(tmp_path):
    w = make_weights(tmp_path / "w")
    (w / WEIGHTS_FILE).write_bytes(b"garbage" * 100)
    import hashlib

    meta = json.loads((w / METADATA_FILE).read_text())
    meta["weights_sha256"] = hashlib.sha256(b"garbage" * 100).hexdigest()
    (w / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="cannot be read"):
        load_weights(w)


def test_mismatched_architecture_fails_clearly(tmp_path):
    w = make_weights(tmp_path / "w")
    meta = json.loads((w / METADATA_FILE).read_text())
    meta["arch"] = "resnet34"
    (w / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="do not fit a resnet34"):
        load_weights(w)
    meta["arch"] = "vgg11"
    (w / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="unknown architecture"):
        load_weights(w)


def test_wrong_class_count_and_bad_json(tmp_path):
    w = make_weights(tmp_path / "w")
    meta = json.loads((w / METADATA_FILE).read_text())
    meta["class_names"] = ["a", "b"]
    (w / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="2 classes"):
        load_weights(w)
    (w / METADATA_FILE).write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_weights(w)


def test_git_lfs_pointer_is_explained(tmp_path):
    w = make_weights(tmp_path / "w")
    (w / WEIGHTS_FILE).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(WeightsError, match="Git LFS pointer"):
        load_weights(w)
