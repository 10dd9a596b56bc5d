"""Data discovery, validation errors, decoding and the duplicate-aware validation split."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import CLASSES, make_dataset
from PIL import Image

from tumor_xai.data import DataError, decode_samples, discover, split_train_val
from tumor_xai.duplicates import group_ids, near_duplicate_pairs, thumbnail


def test_discover_finds_sorted_classes_and_counts(tiny_dataset):
    ds = discover(tiny_dataset)
    assert ds.class_names == sorted(CLASSES)
    assert len(ds.splits["Training"]) == 40 and len(ds.splits["Testing"]) == 16
    assert {s.label for s in ds.splits["Training"]} == {0, 1, 2, 3}


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")


def test_missing_split_is_named(tmp_path):
    make_dataset(tmp_path, {"Training": 1})
    with pytest.raises(DataError, match="Missing split folder .*Testing"):
        discover(tmp_path)


def test_missing_class_in_one_split_is_named(tmp_path):
    make_dataset(tmp_path, {"Training": 1, "Testing": 1})
    shutil.rmtree(tmp_path / "Testing" / "glioma")
    with pytest.raises(DataError, match="glioma"):
        discover(tmp_path)


def test_empty_class_is_named(tmp_path):
    make_dataset(tmp_path, {"Training": 1, "Testing": 1})
    for f in (tmp_path / "Training" / "pituitary").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="pituitary is empty"):
        discover(tmp_path)


def test_non_image_file_is_named(tmp_path):
    make_dataset(tmp_path, {"Training": 1, "Testing": 1})
    (tmp_path / "Training" / "glioma" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt is not an image"):
        discover(tmp_path)


def test_unreadable_image_fails_or_is_skipped_and_listed(tmp_path):
    make_dataset(tmp_path, {"Training": 2, "Testing": 1})
    bad = tmp_path / "Training" / "glioma" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    samples = discover(tmp_path).splits["Training"]
    with pytest.raises(DataError, match="broken.jpg"):
        decode_samples(samples, 64)
    dec = decode_samples(samples, 64, skip_unreadable=True)
    assert [p.name for p, _ in dec.skipped] == ["broken.jpg"]
    assert len(dec.images) == len(samples) - 1


def test_decode_samples_shapes(tiny_dataset):
    dec = decode_samples(discover(tiny_dataset).splits["Testing"], 32)
    assert dec.images.shape == (16, 32, 32) and dec.images.dtype == np.uint8
    assert dec.thumbs.shape == (16, 32, 32)


def test_split_is_stratified_seeded_and_keeps_duplicates_together(tmp_path):
    make_dataset(tmp_path, {"Training": 20, "Testing": 1})
    # re-encode every glioma image as a second copy: each pair must land on one side
    for f in sorted((tmp_path / "Training" / "glioma").glob("*.jpg")):
        Image.open(f).save(f.with_name(f.stem + "_copy.jpg"), quality=70)
    dec = decode_samples(discover(tmp_path).splits["Training"], 32)
    tr, va = split_train_val(dec.labels, dec.thumbs, 0.2, seed=1)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(dec.labels)
    for label in range(4):  # stratified: roughly 20 % of each class
        n = int(np.sum(dec.labels == label))
        assert abs(int(np.sum(dec.labels[va] == label)) - 0.2 * n) <= 2
    names = [p.name for p in dec.paths]
    val_names = {names[i] for i in va}
    for name in names:
        if name.endswith("_copy.jpg"):
            assert (name in val_names) == (name.replace("_copy", "") in val_names), name
    tr2, va2 = split_train_val(dec.labels, dec.thumbs, 0.2, seed=1)
    assert np.array_equal(va, va2)


def test_near_duplicates_found_and_distinct_images_not():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (3, 64, 64)).astype(np.float32)
    thumbs = np.stack([thumbnail(a[0]), thumbnail(np.clip(a[0] + 0.003, 0, 1)), thumbnail(a[1]), thumbnail(a[2])])
    pairs = near_duplicate_pairs(thumbs)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert list(group_ids(4, pairs))[0] == list(group_ids(4, pairs))[1]
    cross = near_duplicate_pairs(thumbs[:1], thumbs[1:])
    assert [(i, j) for i, j, _ in cross] == [(0, 0)]
