"""Ground-truth lookup (guard.evaluation.ground_truth): images by LAION index, from a folder or a mapping file."""

import json
from pathlib import Path

import pytest
from PIL import Image

from guard.evaluation import MissingGroundTruthError, PromptRecord, find_ground_truth


def _image(path: Path, colour=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_ground_truth_folder_by_index_with_several_images(tmp_path):
    one = _image(tmp_path / "123.png")
    several = [_image(tmp_path / "456_0.jpg"), _image(tmp_path / "456_1.jpg")]
    nested = [_image(tmp_path / "789" / "a.png"), _image(tmp_path / "789" / "b.webp")]
    (tmp_path / "notes.txt").write_text("not an image")
    records = [PromptRecord("x", index=123), PromptRecord("y", index=456), PromptRecord("z", index=789)]
    truth = find_ground_truth(records, tmp_path)
    assert truth["123"] == (one,) and truth["456"] == tuple(several) and truth["789"] == tuple(nested)
    assert truth.missing == ()
    assert [image.size for image in truth.images("456")] == [(8, 8), (8, 8)]


def test_missing_ground_truth_is_an_error_naming_the_prompts(tmp_path):
    _image(tmp_path / "123.png")
    records = [PromptRecord("x", index=123), PromptRecord("y", index=999), PromptRecord("z", index=1000)]
    with pytest.raises(MissingGroundTruthError, match="2 prompt.*999, 1000") as raised:
        find_ground_truth(records, tmp_path)
    assert raised.value.missing == ["999", "1000"]
    truth = find_ground_truth(records, tmp_path, allow_missing=True)
    assert truth.missing == ("999", "1000") and "123" in truth and "999" not in truth and len(truth) == 1


def test_ground_truth_mapping_files(tmp_path):
    a, b = _image(tmp_path / "img" / "a.png"), _image(tmp_path / "img" / "b.png")
    (tmp_path / "map.json").write_text(json.dumps({"1": "img/a.png", "2": ["img/a.png", "img/b.png"]}))
    (tmp_path / "map.csv").write_text("index,path\n1,img/a.png\n2,img/a.png\n2,img/b.png\n")
    records = [PromptRecord("x", index=1), PromptRecord("y", index=2)]
    for mapping in ("map.json", "map.csv"):
        truth = find_ground_truth(records, mapping_file=tmp_path / mapping)
        assert truth["1"] == (a,) and truth["2"] == (a, b)
    (tmp_path / "bad.json").write_text(json.dumps({"1": "img/nothing.png"}))
    with pytest.raises(FileNotFoundError, match="1 file.*nothing.png"):
        find_ground_truth(records, mapping_file=tmp_path / "bad.json")


def test_ground_truth_needs_an_index_and_one_source(tmp_path):
    with pytest.raises(ValueError, match="has no LAION index"):
        find_ground_truth([PromptRecord("a cat")], tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        find_ground_truth([], tmp_path, mapping_file=tmp_path / "m.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_ground_truth([], tmp_path / "absent")
