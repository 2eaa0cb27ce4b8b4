"""Prompt-list loaders (on the public lists and on small hand-written files) and ground-truth lookup."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from guard.evaluation import (
    DATA_DIR_ENV,
    MissingGroundTruthError,
    PromptRecord,
    find_ground_truth,
    load_nemo_memorized,
    load_nemo_unmemorized,
    load_prompt_set,
    load_sd1_nonmemorized,
    load_sd2_memorized,
    load_sdv1_memorized,
    reference_scores,
    resolve_data_dir,
    select_above,
    select_kind,
    split_by_kind,
)
from guard.evaluation.prompts import load_nemo_csv, load_text_lines, load_webster_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """The public lists beside the repository; their absence is a failure unless explicitly waived."""
    if not (SHARED_DATA / "sdv1_500_memorized.jsonl").is_file():
        if os.environ.get("GUARD_SKIP_SHARED_DATA"):
            pytest.skip(f"GUARD_SKIP_SHARED_DATA is set and the public prompt lists are not at {SHARED_DATA}")
        pytest.fail(f"public prompt lists not found at {SHARED_DATA} (set GUARD_SKIP_SHARED_DATA to skip these tests)")
    return SHARED_DATA


# ---------------------------------------------------------------- the public lists


def test_public_lists_load_with_their_row_counts(shared_data):
    assert len(load_sdv1_memorized(shared_data)) == 500
    assert len(load_nemo_memorized(shared_data)) == 500
    assert len(load_nemo_unmemorized(shared_data)) == 500
    # 219 JSON lines / 500 text lines: the last line of each file has no trailing newline.
    assert len(load_sd2_memorized(shared_data)) == 219
    assert len(load_sd1_nonmemorized(shared_data)) == 500


def test_public_lists_split_into_verbatim_and_template(shared_data):
    nemo = split_by_kind(load_nemo_memorized(shared_data))
    assert (len(nemo["verbatim"]), len(nemo["template"])) == (112, 388)
    assert {record.label for record in nemo["verbatim"]} == {"VM"}
    assert {record.label for record in nemo["template"]} == {"TM"}
    sd2 = split_by_kind(load_sd2_memorized(shared_data))
    assert (len(sd2["verbatim"]), len(sd2["template"])) == (4, 215)
    assert all(record.kind is None for record in load_nemo_unmemorized(shared_data))
    assert all(record.kind is None and record.index is None for record in load_sd1_nonmemorized(shared_data))


def test_sdv1_list_takes_kinds_and_scores_from_the_nemo_csv(shared_data):
    sdv1 = load_sdv1_memorized(shared_data)
    nemo = {record.index: record for record in load_nemo_memorized(shared_data)}
    assert len({record.key for record in sdv1}) == 500
    for record in sdv1:
        twin = nemo[record.index]
        assert (record.caption, record.url, record.kind) == (twin.caption, twin.url, twin.kind)
        assert record.reference_mean_sscd == twin.reference_mean_sscd
    assert sdv1[0].caption == "The No Limits Business Woman Podcast" and sdv1[0].index == 1030727993
    assert sdv1[0].source == "sdv1_500_memorized.jsonl"


def test_public_unmitigated_sscd_filter(shared_data):
    records = load_sdv1_memorized(shared_data)
    mean_scores = reference_scores(records, "mean_sscd")
    assert len(mean_scores) == 487  # 13 template rows have no NeMo score
    with pytest.raises(KeyError, match="missing='exclude'"):
        select_above(records, mean_scores)
    memorized = select_above(records, mean_scores, 0.7, missing="exclude")
    assert len(memorized) == 68
    assert all(record.kind == "verbatim" and record.reference_mean_sscd > 0.7 for record in memorized)
    by_max = select_above(records, reference_scores(records, "max_sscd"), missing="exclude")
    assert len(by_max) == 112 and {record.kind for record in by_max} == {"verbatim"}


def test_prompt_sets_by_name_and_from_the_environment(shared_data, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data))
    assert resolve_data_dir() == shared_data
    assert [r.caption for r in load_prompt_set("sd2-memorized")] == [r.caption for r in load_sd2_memorized(shared_data)]
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("laion-everything")


# ---------------------------------------------------------------- parsing, on small hand-written files


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def test_nemo_csv_parsing_handles_quotes_semicolons_and_empty_scores(tmp_path):
    path = _write(
        tmp_path / "m.csv",
        ";Caption;URL;type;mean_sscd;max_sscd;Index\n"
        '0;"""Quoted"" title; with a semicolon";http://a/1.jpg;VM;0.9;0.95;111\n'
        "1;Plain caption;http://a/2.jpg;TM;;;222\n",
    )
    first, second = load_nemo_csv(path)
    assert first == PromptRecord(
        caption='"Quoted" title; with a semicolon',
        index=111,
        url="http://a/1.jpg",
        kind="verbatim",
        label="VM",
        reference_mean_sscd=0.9,
        reference_max_sscd=0.95,
        source="m.csv",
        row=0,
    )
    assert (second.kind, second.reference_mean_sscd, second.reference_max_sscd, second.key) == (
        "template",
        None,
        None,
        "222",
    )


def test_nemo_csv_without_type_or_scores(tmp_path):
    path = _write(tmp_path / "u.csv", ";Caption;URL;Index\n0;A;http://u;7\n1;B;http://v;8\n")
    records = load_nemo_csv(path)
    assert [(r.caption, r.index, r.kind, r.row) for r in records] == [("A", 7, None, 0), ("B", 8, None, 1)]


def test_nemo_csv_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown memorization label 'XX'"):
        load_nemo_csv(_write(tmp_path / "a.csv", ";Caption;URL;type;Index\n0;A;u;XX;1\n"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['Index'\]"):
        load_nemo_csv(_write(tmp_path / "b.csv", ";Caption;URL\n0;A;u\n"))
    with pytest.raises(ValueError, match="line 2: 3 fields"):
        load_nemo_csv(_write(tmp_path / "c.csv", ";Caption;URL;Index\n0;A;u\n"))
    with pytest.raises(ValueError, match="'Index' must be an integer"):
        load_nemo_csv(_write(tmp_path / "d.csv", ";Caption;URL;Index\n0;A;u;abc\n"))


def test_webster_jsonl_parsing(tmp_path):
    path = _write(
        tmp_path / "w.jsonl",
        '{"caption":"Floor \\u00e9 tile","url":"https:\\/\\/x\\/1.jpg","index":5,"overfit_type":"TV"}\n'
        "\n"
        '{"caption": "Mug", "index": 6, "url": "http://y"}',
    )
    first, second = load_webster_jsonl(path)
    assert (first.caption, first.url, first.index, first.kind, first.label) == (
        "Floor é tile",
        "https://x/1.jpg",
        5,
        "template",
        "TV",
    )
    assert (second.caption, second.kind, second.label, second.row) == ("Mug", None, None, 1)


def test_webster_jsonl_errors_name_the_line(tmp_path):
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_webster_jsonl(_write(tmp_path / "a.jsonl", '{"caption":"a","index":1,"url":"u"}\n{oops\n'))
    with pytest.raises(ValueError, match=r"line 1: missing field\(s\) \['url'\]"):
        load_webster_jsonl(_write(tmp_path / "b.jsonl", '{"caption":"a","index":1}\n'))


def test_text_list_skips_blank_lines_and_keys_by_position(tmp_path):
    records = load_text_lines(_write(tmp_path / "t.txt", "a cat\r\n\n  \na dog"))
    assert [(r.caption, r.key) for r in records] == [("a cat", "row0"), ("a dog", "row1")]


def test_sdv1_join_requires_every_prompt_in_the_csv(tmp_path):
    _write(
        tmp_path / "sdv1_500_memorized.jsonl",
        '{"caption":"a","index":1,"url":"u"}\n{"caption":"b","index":2,"url":"v"}\n',
    )
    _write(tmp_path / "memorized_laion_prompts.csv", ";Caption;URL;type;mean_sscd;max_sscd;Index\n0;a;u;VM;0.8;0.9;1\n")
    with pytest.raises(ValueError, match=r"1 prompt\(s\) of sdv1_500_memorized.jsonl have no row.*\[2\]"):
        load_sdv1_memorized(tmp_path)


def test_data_dir_errors_say_where_the_lists_come_from(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="GUARD_DATA_DIR.*Wen et al.*NeMo"):
        resolve_data_dir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="sd2_mem.jsonl not found"):
        load_sd2_memorized(tmp_path)


def test_select_above_is_strict_and_select_kind_validates():
    records = [PromptRecord("a", index=1, kind="verbatim"), PromptRecord("b", index=2, kind="template")]
    assert [r.key for r in select_above(records, {"1": 0.7, "2": 0.71})] == ["2"]
    assert [r.key for r in select_kind(records, "verbatim")] == ["1"]
    with pytest.raises(ValueError, match="kind must be one of"):
        select_kind(records, "exact")
    with pytest.raises(ValueError, match="kind must be one of"):
        PromptRecord("c", kind="VM")


# ---------------------------------------------------------------- ground-truth images


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
