"""Prompt-list loaders: the shipped NeMo lists, where lists are read from, parsing on small fixture files in
tests/data, the full public lists when GUARD_DATA_DIR names a folder holding them."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from guard.evaluation import (
    DATA_DIR_ENV,
    LIST_SOURCES,
    PROMPT_SETS,
    PromptRecord,
    list_path,
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
from guard.evaluation.prompts import (
    NEMO_MEMORIZED,
    NEMO_UNMEMORIZED,
    SD1_NONMEMORIZED,
    SD2_MEMORIZED,
    SDV1_MEMORIZED,
    SHIPPED_DIR,
    SHIPPED_LISTS,
    load_nemo_csv,
    load_prompts,
    load_text_lines,
    load_webster_jsonl,
)

FIXTURES = Path(__file__).resolve().parent / "data"
LISTS = FIXTURES / "lists"
BAD = FIXTURES / "bad"

#: sha256 of the upstream files (ml-research/localizing_memorization_in_diffusion_models, prompts/).
UPSTREAM_SHA256 = {
    NEMO_MEMORIZED: "0b527a5965dc463e7a3e0d234ff7fd5489b1a76869c456dbb209dc753cb4af25",
    NEMO_UNMEMORIZED: "f453b418cc157864baacbf68d97447273feac41e8066b2ead6b307bf795988e1",
}


@pytest.fixture
def no_data_dir(monkeypatch):
    """GUARD_DATA_DIR unset, so that only the shipped copies can answer."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def public_dir(name: str) -> Path:
    """The GUARD_DATA_DIR folder holding the public list ``name``; the test is skipped without one."""
    folder = os.environ.get(DATA_DIR_ENV)
    if not folder:
        pytest.skip(f"{DATA_DIR_ENV} is unset; point it at a folder holding the public prompt lists to run this test")
    if not (Path(folder) / name).is_file():
        pytest.skip(f"{DATA_DIR_ENV}={folder} holds no {name}")
    return Path(folder)


# ---------------------------------------------------------------- the lists shipped with the package


def test_shipped_nemo_lists_load_without_a_folder(no_data_dir):
    assert list_path(NEMO_MEMORIZED) == SHIPPED_DIR / NEMO_MEMORIZED
    memorized, unmemorized = load_nemo_memorized(), load_nemo_unmemorized()
    assert (len(memorized), len(unmemorized)) == (500, 500)
    assert [record.row for record in memorized] == list(range(500))
    nemo = split_by_kind(memorized)
    assert (len(nemo["verbatim"]), len(nemo["template"])) == (112, 388)
    assert {record.label for record in nemo["verbatim"]} == {"VM"}
    assert {record.label for record in nemo["template"]} == {"TM"}
    assert all(record.kind is None and record.index is not None for record in unmemorized)
    assert load_prompt_set("nemo-unmemorized") == unmemorized


def test_shipped_lists_are_the_upstream_files_with_source_and_licence():
    readme = (SHIPPED_DIR / "README.md").read_text(encoding="utf-8")
    assert sorted(path.name for path in SHIPPED_DIR.iterdir()) == sorted([*SHIPPED_LISTS, "LICENSE-NeMo", "README.md"])
    for name in SHIPPED_LISTS:
        assert hashlib.sha256((SHIPPED_DIR / name).read_bytes()).hexdigest() == UPSTREAM_SHA256[name]
        assert name in readme and UPSTREAM_SHA256[name] in readme
    assert "f952eded64fca0bcf42e0bb3be9a01d64653cfdb" in readme
    licence = (SHIPPED_DIR / "LICENSE-NeMo").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "Copyright (c) 2024 ml-research@TUDarmstadt" in licence


def test_sdv1_without_its_jsonl_is_built_from_the_nemo_csv(no_data_dir):
    sdv1 = load_sdv1_memorized()
    nemo = load_nemo_memorized()
    assert len(sdv1) == 500 and len({record.key for record in sdv1}) == 500
    for record, twin in zip(sdv1, nemo):
        assert (record.caption, record.index, record.url, record.kind, record.label) == (
            twin.caption,
            twin.index,
            twin.url,
            twin.kind,
            twin.label,
        )
        assert (record.reference_mean_sscd, record.reference_max_sscd) == (
            twin.reference_mean_sscd,
            twin.reference_max_sscd,
        )
    assert sdv1[0].caption == "The No Limits Business Woman Podcast" and sdv1[0].index == 1030727993
    assert {record.source for record in sdv1} == {SDV1_MEMORIZED}
    assert [record.row for record in sdv1] == list(range(500))
    assert load_prompt_set("sd1-memorized") == sdv1


def test_unmitigated_sscd_filter_on_the_shipped_list(no_data_dir):
    records = load_sdv1_memorized()
    mean_scores = reference_scores(records, "mean_sscd")
    assert len(mean_scores) == 487  # 13 template rows have no NeMo score
    with pytest.raises(KeyError, match="missing='exclude'"):
        select_above(records, mean_scores)
    memorized = select_above(records, mean_scores, 0.7, missing="exclude")
    assert len(memorized) == 68
    assert all(record.kind == "verbatim" and record.reference_mean_sscd > 0.7 for record in memorized)
    by_max = select_above(records, reference_scores(records, "max_sscd"), missing="exclude")
    assert len(by_max) == 112 and {record.kind for record in by_max} == {"verbatim"}


@pytest.mark.parametrize(
    ("loader", "name", "url"),
    [
        (load_sd2_memorized, SD2_MEMORIZED, "github.com/Dongjae0324/sharpness_memorization_diffusion"),
        (load_sd1_nonmemorized, SD1_NONMEMORIZED, "github.com/Dongjae0324/sharpness_memorization_diffusion"),
    ],
)
def test_unshipped_lists_say_where_to_get_them(no_data_dir, loader, name, url):
    with pytest.raises(FileNotFoundError, match=f"{name} is not shipped.*{url}.*data_dir=FOLDER.*{DATA_DIR_ENV}="):
        loader()
    assert url in LIST_SOURCES[name]
    with pytest.raises(FileNotFoundError, match="github.com/YuxinWenRick/diffusion_memorization"):
        list_path(SDV1_MEMORIZED)
    with pytest.raises(ValueError, match="unknown prompt list 'coco.txt'"):
        list_path("coco.txt")


# ---------------------------------------------------------------- where a list is read from


def test_an_explicit_data_dir_must_hold_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(LISTS))  # would answer, but an explicit folder comes first
    with pytest.raises(FileNotFoundError, match=f"{NEMO_MEMORIZED} not found in .*give no data_dir to use the copy"):
        load_nemo_memorized(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{SD2_MEMORIZED} not found in .*Dongjae0324"):
        load_sd2_memorized(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{SDV1_MEMORIZED} not found in .*YuxinWenRick"):
        load_sdv1_memorized(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_nemo_memorized(tmp_path / "absent")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert list_path(SD2_MEMORIZED, LISTS) == LISTS / SD2_MEMORIZED
    assert len(load_nemo_memorized(LISTS)) == 4


def test_guard_data_dir_comes_before_the_shipped_copy(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(LISTS))
    assert resolve_data_dir() == LISTS
    assert {name: len(load_prompt_set(name)) for name in PROMPT_SETS} == {
        "sd1-memorized": 4,
        "sd1-verbatim": 2,
        "sd1-template": 2,
        "nemo-memorized": 4,
        "nemo-unmemorized": 2,
        "sd2-memorized": 5,
        "sd2-verbatim": 2,
        "sd2-template": 1,
        "sd1-nonmemorized": 3,
    }
    monkeypatch.setenv(DATA_DIR_ENV, str(BAD))  # holds none of the lists
    assert list_path(NEMO_UNMEMORIZED) == SHIPPED_DIR / NEMO_UNMEMORIZED
    assert len(load_sdv1_memorized()) == 500
    with pytest.raises(FileNotFoundError, match=f"{DATA_DIR_ENV}=.*bad does not hold it; get it from"):
        load_sd1_nonmemorized()


def test_resolve_data_dir_errors_say_where_the_lists_come_from(no_data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="GUARD_DATA_DIR.*Wen et al.*Jeon et al.*NeMo.*ship"):
        resolve_data_dir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "absent")
    assert resolve_data_dir(tmp_path) == tmp_path


def test_sdv1_jsonl_is_joined_with_the_csv_beside_it(no_data_dir):
    sdv1 = load_sdv1_memorized(LISTS)
    assert [(r.index, r.kind, r.label, r.reference_mean_sscd, r.row) for r in sdv1] == [
        (111, "verbatim", "VM", 0.9, 0),
        (222, "template", "TM", None, 1),
        (333, "verbatim", "VM", 0.65, 2),
        (444, "template", "TM", 0.2, 3),
    ]
    assert sdv1[0].caption == '"Quoted" title; with a semicolon' and {r.source for r in sdv1} == {SDV1_MEMORIZED}
    assert [(r.caption, r.url) for r in sdv1] == [(r.caption, r.url) for r in load_nemo_memorized(LISTS)]


def test_sdv1_jsonl_alone_is_joined_with_the_shipped_csv(no_data_dir, tmp_path):
    shipped = load_sdv1_memorized()[:3]
    lines = [json.dumps({"caption": r.caption, "index": r.index, "url": r.url}) for r in shipped]
    (tmp_path / SDV1_MEMORIZED).write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_sdv1_memorized(tmp_path) == shipped
    (tmp_path / SDV1_MEMORIZED).write_text('{"caption": "x", "index": 12345, "url": "u"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"no row in .*guard/evaluation/data/memorized_laion_prompts.csv.*\[12345\]"):
        load_sdv1_memorized(tmp_path)


def test_sdv1_join_requires_every_prompt_in_the_csv():
    with pytest.raises(ValueError, match=r"1 prompt\(s\) of sdv1_500_memorized.jsonl .*have no row.*\[2\]"):
        load_sdv1_memorized(FIXTURES / "unmatched")


def test_prompt_sets_by_name():
    assert load_prompt_set("sd2-memorized", LISTS) == load_sd2_memorized(LISTS)
    assert load_prompt_set("sd1-nonmemorized", LISTS) == load_sd1_nonmemorized(LISTS)
    assert load_prompt_set("sd2-template", LISTS) == select_kind(load_sd2_memorized(LISTS), "template")
    assert [r.kind for r in load_prompt_set("sd1-verbatim")] == ["verbatim"] * len(load_prompt_set("sd1-verbatim"))
    assert len(load_prompt_set("sd1-verbatim")) + len(load_prompt_set("sd1-template")) == 500
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("laion-everything")


def test_prompts_by_name_or_by_file_format(tmp_path):
    assert load_prompts("sd1-template", LISTS) == load_prompt_set("sd1-template", LISTS)
    assert load_prompts(LISTS / NEMO_MEMORIZED) == load_nemo_csv(LISTS / NEMO_MEMORIZED)
    assert load_prompts(str(LISTS / SD2_MEMORIZED)) == load_webster_jsonl(LISTS / SD2_MEMORIZED)
    (tmp_path / "mine.txt").write_text("a cat\n\na dog\n", encoding="utf-8")
    assert [(r.caption, r.key) for r in load_prompts(tmp_path / "mine.txt")] == [("a cat", "row0"), ("a dog", "row1")]
    with pytest.raises(FileNotFoundError, match="neither a prompt set .*sd1-verbatim.* nor a file"):
        load_prompts("sd1-everything")


# ---------------------------------------------------------------- parsing, on the fixture files


def test_nemo_csv_handles_quotes_semicolons_blank_lines_and_empty_scores():
    first, second, third, fourth = load_nemo_csv(LISTS / NEMO_MEMORIZED)
    assert first == PromptRecord(
        caption='"Quoted" title; with a semicolon',
        index=111,
        url="http://example.com/1.jpg",
        kind="verbatim",
        label="VM",
        reference_mean_sscd=0.9,
        reference_max_sscd=0.95,
        source=NEMO_MEMORIZED,
        row=0,
    )
    assert (second.kind, second.reference_mean_sscd, second.reference_max_sscd, second.key) == (
        "template",
        None,
        None,
        "222",
    )
    assert (third.reference_max_sscd, fourth.row, fourth.caption) == (0.72, 3, "Template with a score")


def test_nemo_csv_without_type_or_scores():
    records = load_nemo_csv(LISTS / NEMO_UNMEMORIZED)
    assert [(r.caption, r.index, r.kind, r.label, r.reference_mean_sscd, r.row) for r in records] == [
        ("A quiet harbour at dawn", 7, None, None, None, 0),
        ("Café sign, hand-painted", 8, None, None, None, 1),
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nemo_unknown_label.csv", "line 2: unknown memorization label 'XX'"),
        ("nemo_no_index_column.csv", r"lacks column\(s\) \['Index'\]"),
        ("nemo_short_row.csv", "line 2: 3 fields, the header has 4"),
        ("nemo_bad_index.csv", "'Index' must be an integer, got 'abc'"),
        ("nemo_bad_score.csv", "'mean_sscd' must be a number or empty, got 'high'"),
        ("nemo_nan_score.csv", "'max_sscd' must be finite"),
        ("nemo_empty.csv", "empty file, expected a header row"),
    ],
)
def test_nemo_csv_errors_name_the_problem(name, message):
    with pytest.raises(ValueError, match=f"{name}.*{message}"):
        load_nemo_csv(BAD / name)


def test_webster_jsonl_with_and_without_overfit_type():
    records = load_webster_jsonl(LISTS / SD2_MEMORIZED)
    assert [(r.index, r.kind, r.label, r.row) for r in records] == [
        (5, "template", "TV", 0),
        (6, "verbatim", "MV", 1),
        (7, "verbatim", "RV", 2),
        (8, None, "N", 3),
        (9, None, None, 4),
    ]
    assert (records[0].caption, records[0].url) == ("Floor é tile", "https://example.com/1.jpg")
    assert (records[-1].caption, records[-1].url, records[-1].source) == (
        "Mug",
        "http://example.com/5.jpg",
        SD2_MEMORIZED,
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("webster_bad_json.jsonl", "line 2: not valid JSON"),
        ("webster_missing_url.jsonl", r"line 1: missing field\(s\) \['url'\]"),
        ("webster_not_an_object.jsonl", "line 1: expected a JSON object, got list"),
        ("webster_caption_not_text.jsonl", "line 1: field 'caption' must be a string, got 3"),
        ("webster_bool_index.jsonl", "line 1: field 'index' must be an integer, got True"),
        ("webster_unknown_label.jsonl", "line 1: unknown memorization label 'ZZ'"),
    ],
)
def test_webster_jsonl_errors_name_the_line(name, message):
    with pytest.raises(ValueError, match=f"{name} {message}"):
        load_webster_jsonl(BAD / name)


def test_text_list_skips_blank_lines_and_keys_by_position():
    records = load_text_lines(LISTS / SD1_NONMEMORIZED)
    assert [(r.caption, r.key, r.index, r.kind) for r in records] == [
        ("a cat on a sofa", "row0", None, None),
        ("a dog in the park", "row1", None, None),
        ("three birds on a wire", "row2", None, None),
    ]


def test_select_above_is_strict_and_select_kind_validates():
    records = [PromptRecord("a", index=1, kind="verbatim"), PromptRecord("b", index=2, kind="template")]
    assert [r.key for r in select_above(records, {"1": 0.7, "2": 0.71})] == ["2"]
    assert [r.key for r in select_kind(records, "verbatim")] == ["1"]
    with pytest.raises(ValueError, match="kind must be one of"):
        select_kind(records, "exact")
    with pytest.raises(ValueError, match="kind must be one of"):
        PromptRecord("c", kind="VM")


# ---------------------------------------------------------------- the full public lists, from GUARD_DATA_DIR


@pytest.mark.public_lists
def test_public_lists_load_with_their_row_counts():
    assert len(load_sdv1_memorized(public_dir(SDV1_MEMORIZED))) == 500
    assert len(load_nemo_memorized(public_dir(NEMO_MEMORIZED))) == 500
    assert len(load_nemo_unmemorized(public_dir(NEMO_UNMEMORIZED))) == 500
    # 219 JSON lines / 500 text lines: the last line of each file has no trailing newline.
    assert len(load_sd2_memorized(public_dir(SD2_MEMORIZED))) == 219
    assert len(load_sd1_nonmemorized(public_dir(SD1_NONMEMORIZED))) == 500


@pytest.mark.public_lists
def test_public_lists_split_into_verbatim_and_template():
    nemo = split_by_kind(load_nemo_memorized(public_dir(NEMO_MEMORIZED)))
    assert (len(nemo["verbatim"]), len(nemo["template"])) == (112, 388)
    assert {record.label for record in nemo["verbatim"]} == {"VM"}
    assert {record.label for record in nemo["template"]} == {"TM"}
    sd2 = split_by_kind(load_sd2_memorized(public_dir(SD2_MEMORIZED)))
    assert (len(sd2["verbatim"]), len(sd2["template"])) == (4, 215)
    assert all(record.kind is None for record in load_nemo_unmemorized(public_dir(NEMO_UNMEMORIZED)))
    nonmemorized = load_sd1_nonmemorized(public_dir(SD1_NONMEMORIZED))
    assert all(record.kind is None and record.index is None for record in nonmemorized)


@pytest.mark.public_lists
def test_public_sdv1_jsonl_join_equals_the_list_built_from_nemo(monkeypatch):
    folder = public_dir(SDV1_MEMORIZED)
    joined = load_sdv1_memorized(folder)
    nemo = {record.index: record for record in load_nemo_memorized()}  # the CSV the join read: beside it or shipped
    assert len({record.key for record in joined}) == 500
    for record in joined:
        twin = nemo[record.index]
        assert (record.caption, record.url, record.kind) == (twin.caption, twin.url, twin.kind)
        assert record.reference_mean_sscd == twin.reference_mean_sscd
    assert joined[0].caption == "The No Limits Business Woman Podcast" and joined[0].index == 1030727993
    assert joined[0].source == SDV1_MEMORIZED
    monkeypatch.delenv(DATA_DIR_ENV)
    assert load_sdv1_memorized() == joined  # built from the shipped NeMo CSV alone


@pytest.mark.public_lists
def test_public_nemo_lists_equal_the_shipped_copies(monkeypatch):
    folders = {name: public_dir(name) for name in SHIPPED_LISTS}
    from_folder = [load_nemo_csv(folders[name] / name) for name in SHIPPED_LISTS]
    monkeypatch.delenv(DATA_DIR_ENV)
    assert from_folder == [load_nemo_memorized(), load_nemo_unmemorized()]


@pytest.mark.public_lists
def test_public_lists_from_the_environment():
    folder = public_dir(SD2_MEMORIZED)
    assert resolve_data_dir() == folder and list_path(SD2_MEMORIZED) == folder / SD2_MEMORIZED
    assert load_prompt_set("sd2-memorized") == load_sd2_memorized(folder)
