"""The resumable evaluation runner, with a fake image generator and stand-in scorers; its results feed the table."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from guard.evaluation import (
    ClipScorer,
    PromptRecord,
    SSCDScorer,
    evaluate_prompts,
    rescore,
)
from guard.evaluation.__main__ import main as cli_main
from guard.evaluation.results import read_rows

RED, BLUE = (255, 0, 0), (0, 0, 255)
PROMPTS = [PromptRecord(f"red item {i}", index=i, kind="verbatim" if i % 2 else "template") for i in range(1, 6)]
METHODS = {"copy": "copy-setting", "mitigated": "mitigated-setting"}


class FakeGenerator:
    """Solid 16x16 images: red (the ground truth's colour) for the "copy" setting, blue otherwise."""

    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, prompt, method, seed, num_images):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls.append((prompt, method, seed))
        colour = RED if method == "copy-setting" else BLUE
        return [Image.new("RGB", (16, 16), colour) for _ in range(num_images)]


class MeanColour(torch.nn.Module):
    """SSCD stand-in: an image's embedding is its mean normalised colour."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def stand_in_clip():
    return ClipScorer(
        lambda images: torch.tensor(np.array([np.asarray(i, dtype=np.float32).mean(axis=(0, 1)) for i in images])),
        lambda texts: torch.tensor([[1.0, 0.0, 0.0] if "red" in text else [0.0, 1.0, 0.0] for text in texts]),
    )


def ground_truth_all_red():
    return {record.key: [Image.new("RGB", (20, 20), RED)] for record in PROMPTS}


# ---------------------------------------------------------------- resuming


def test_an_interrupted_run_resumes_with_only_the_missing_work(tmp_path):
    out = tmp_path / "run"
    interrupted = FakeGenerator(fail_after=5)  # 2 seeds per (prompt, method): 2 rows done, the 3rd half done
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_prompts(interrupted, PROMPTS, METHODS, out_dir=out, num_images=2, seeds=[3, 7], progress=False)
    done = [(row["key"], row["method"]) for row in read_rows(out)]
    assert done == [("1", "copy"), ("1", "mitigated")]

    resumed = FakeGenerator()
    rows = evaluate_prompts(resumed, PROMPTS, METHODS, out_dir=out, num_images=2, seeds=[3, 7], progress=False)
    expected_calls = [
        (record.caption, METHODS[name], seed) for record in PROMPTS for name in METHODS for seed in (3, 7)
    ][4:]
    assert resumed.calls == expected_calls  # the half-done pair is redone from its first seed
    assert sorted((row["key"], row["method"]) for row in rows) == sorted((r.key, m) for r in PROMPTS for m in METHODS)
    assert len(list((out / "images").rglob("*.png"))) == 5 * 2 * 2 * 2
    assert rows[0]["images"] == [
        "images/copy/1/s3_0.png",
        "images/copy/1/s3_1.png",
        "images/copy/1/s7_0.png",
        "images/copy/1/s7_1.png",
    ]
    assert all((out / path).is_file() for row in rows for path in row["images"])

    again = FakeGenerator()
    evaluate_prompts(again, PROMPTS, METHODS, out_dir=out, num_images=2, seeds=[3, 7], progress=False)
    assert again.calls == []


def test_a_line_cut_short_by_a_crash_is_redone(tmp_path):
    out = tmp_path / "run"
    evaluate_prompts(FakeGenerator(), PROMPTS[:1], ["copy"], out_dir=out, num_images=1, progress=False)
    with (out / "results.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"key": "2", "meth')
    with pytest.warns(UserWarning, match="unfinished last line"):
        assert len(read_rows(out)) == 1
    generator = FakeGenerator()
    rows = evaluate_prompts(generator, PROMPTS[:2], ["copy"], out_dir=out, num_images=1, progress=False)
    assert [row["key"] for row in rows] == ["1", "2"] and len(generator.calls) == 1
    assert all(json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())


def test_resume_refuses_changed_settings_but_accepts_new_methods(tmp_path):
    out = tmp_path / "run"
    evaluate_prompts(FakeGenerator(), PROMPTS[:2], {"copy": {"scale": 1.0}}, out_dir=out, num_images=1, progress=False)
    with pytest.raises(ValueError, match="num_images=1.*num_images=2"):
        evaluate_prompts(
            FakeGenerator(), PROMPTS[:2], {"copy": {"scale": 1.0}}, out_dir=out, num_images=2, progress=False
        )
    with pytest.raises(ValueError, match="method 'copy'.*was run with settings"):
        evaluate_prompts(
            FakeGenerator(), PROMPTS[:2], {"copy": {"scale": 2.0}}, out_dir=out, num_images=1, progress=False
        )
    renamed = [PromptRecord("blue thing", index=1)]
    with pytest.raises(ValueError, match="prompt list changed"):
        evaluate_prompts(FakeGenerator(), renamed, {"copy": {"scale": 1.0}}, out_dir=out, num_images=1, progress=False)
    generator = FakeGenerator()
    evaluate_prompts(
        generator, PROMPTS[:2], {"copy": {"scale": 1.0}, "other": "x"}, out_dir=out, num_images=1, progress=False
    )
    assert [call[1] for call in generator.calls] == ["x", "x"]
    assert set(json.loads((out / "run.json").read_text())["methods"]) == {"copy", "other"}


def test_runner_argument_errors(tmp_path):
    def run(prompts=PROMPTS[:1], methods=("copy",), generate=None, **kwargs):
        generate = FakeGenerator() if generate is None else generate
        return evaluate_prompts(generate, prompts, methods, out_dir=tmp_path / "r", progress=False, **kwargs)

    with pytest.raises(ValueError, match="duplicate keys"):
        run(prompts=[PromptRecord("a", index=1), PromptRecord("b", index=1)])
    with pytest.raises(ValueError, match="method names must be"):
        run(methods=["has space"])
    with pytest.raises(ValueError, match="num_images must be a positive int"):
        run(num_images=0)
    with pytest.raises(ValueError, match="sscd needs ground_truth"):
        run(sscd=SSCDScorer(MeanColour()))
    with pytest.raises(ValueError, match=r"generate returned 1 item\(s\) for prompt 1.*expected a list of 2"):
        run(generate=lambda prompt, method, seed, n: [Image.new("RGB", (4, 4))], num_images=2)


def test_plain_string_prompts_are_keyed_by_position(tmp_path):
    rows = evaluate_prompts(
        FakeGenerator(), ["a cat", "a dog"], ["copy"], out_dir=tmp_path, num_images=1, progress=False
    )
    assert [(row["key"], row["caption"], row["index"]) for row in rows] == [
        ("row0", "a cat", None),
        ("row1", "a dog", None),
    ]


# ---------------------------------------------------------------- scoring


def test_rows_carry_sscd_and_clip_scores(tmp_path):
    rows = evaluate_prompts(
        FakeGenerator(),
        PROMPTS[:2],
        METHODS,
        out_dir=tmp_path,
        num_images=2,
        sscd=SSCDScorer(MeanColour()),
        ground_truth=ground_truth_all_red(),
        clip=stand_in_clip(),
        progress=False,
    )
    by_method = {name: [row for row in rows if row["method"] == name] for name in METHODS}
    # Normalised red (1,-1,-1) vs blue (-1,-1,1): cosine -1/3. CLIP: red image vs "red" text 1, blue 0.
    for row in by_method["copy"]:
        assert row["sscd"] == pytest.approx(1.0, abs=1e-6) and row["clip"] == pytest.approx(1.0, abs=1e-6)
    for row in by_method["mitigated"]:
        assert row["sscd"] == pytest.approx(-1 / 3, abs=1e-6) and row["clip"] == pytest.approx(0.0, abs=1e-6)
        assert row["sscd_per_image"] == pytest.approx([-1 / 3, -1 / 3], abs=1e-6)


def test_prompts_without_ground_truth_get_no_sscd(tmp_path):
    truth = {"1": [Image.new("RGB", (20, 20), RED)]}
    rows = evaluate_prompts(
        FakeGenerator(),
        PROMPTS[:2],
        ["copy"],
        out_dir=tmp_path,
        num_images=1,
        sscd=SSCDScorer(MeanColour()),
        ground_truth=truth,
        progress=False,
    )
    assert [row["sscd"] is None for row in rows] == [False, True]


def test_rescore_recomputes_from_the_saved_images(tmp_path):
    evaluate_prompts(FakeGenerator(), PROMPTS[:2], METHODS, out_dir=tmp_path, num_images=1, progress=False)
    assert all("sscd" not in row for row in read_rows(tmp_path))
    rows = rescore(tmp_path, sscd=SSCDScorer(MeanColour()), ground_truth=ground_truth_all_red(), progress=False)
    assert [round(row["sscd"], 6) for row in rows] == [1.0, round(-1 / 3, 6)] * 2
    assert read_rows(tmp_path) == rows
    with pytest.raises(ValueError, match="rescore needs"):
        rescore(tmp_path)


def test_rescore_keeps_each_row_in_the_file_of_the_process_that_wrote_it(tmp_path):
    from guard.evaluation.sharding import Shard

    evaluate_prompts(
        FakeGenerator(), PROMPTS[:2], {"copy": "copy-setting"}, out_dir=tmp_path, num_images=1, progress=False
    )
    evaluate_prompts(
        FakeGenerator(),
        PROMPTS[:4],
        {"copy": "copy-setting"},
        out_dir=tmp_path,
        num_images=1,
        progress=False,
        shard=Shard(1, 2),
    )  # the second process of a launch whose first process did nothing: it takes the second of the two missing
    part = tmp_path / "parts" / "rank-1.jsonl"
    assert [json.loads(line)["key"] for line in part.read_text().splitlines()] == ["4"]
    rows = rescore(tmp_path, sscd=SSCDScorer(MeanColour()), ground_truth=ground_truth_all_red(), progress=False)
    assert [row["key"] for row in rows] == ["1", "2", "4"] and all(row["sscd"] == pytest.approx(1.0) for row in rows)
    assert [json.loads(line)["sscd"] for line in part.read_text().splitlines()] == [pytest.approx(1.0)]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_end_to_end_run_and_command_line_table(tmp_path, capsys):
    evaluate_prompts(
        FakeGenerator(),
        PROMPTS,
        METHODS,
        out_dir=tmp_path,
        num_images=1,
        sscd=SSCDScorer(MeanColour()),
        ground_truth=ground_truth_all_red(),
        progress=False,
    )
    assert cli_main(["summarise", str(tmp_path), "--baseline", "copy", "--no-kinds"]) == 0
    printed = capsys.readouterr().out
    assert "| copy | all | 5 | 5 | 1.000 |" in printed
    assert "| mitigated | all | 5 | 5 | -0.333 |" in printed
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == printed
