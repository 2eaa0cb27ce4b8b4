"""``python -m guard.evaluation run`` on a tiny local pipeline folder: generation, scores, table, resume, batching,
FID, user errors, and a multi-process ``accelerate launch`` that is killed and resumed."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from sampler_utils import tiny_components

import guard.config
from guard.evaluation.__main__ import main
from guard.evaluation.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
LISTS = Path(__file__).resolve().parent / "data" / "lists"
NEMO_CSV = LISTS / "memorized_laion_prompts.csv"  # LAION indices 111 (VM), 222 (TM), 333 (VM), 444 (TM)
PROG = "python -m guard.evaluation"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved SD-shaped pipeline folder (saved once: every process loads the same tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    StableDiffusionPipeline(**tiny_components()).save_pretrained(folder)
    return folder


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on a blue background\na green square by the yellow triangle\na cat\n")
    return path


class MeanColour(torch.nn.Module):
    """SSCD stand-in: an image's embedding is its mean normalised colour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class PooledColour(torch.nn.Module):
    """FID feature stand-in, called like NVIDIA's Inception file (``return_features=True``)."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(img.float() / 255.0, 2).flatten(1)
        return pooled if return_features else pooled[:, :1]


def _script(module, path):
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def _run(*argv):
    return main(["run", *map(str, argv), "--no-progress"])


def test_run_scores_summarises_and_resumes_without_redoing_work(tiny_folder, tmp_path, capsys):
    truth = tmp_path / "truth"
    truth.mkdir()
    for index, colour in ((111, (200, 40, 40)), (222, (40, 200, 40)), (333, (40, 40, 200))):  # 444 has none
        Image.new("RGB", (20, 20), colour).save(truth / f"{index}.png")
    sscd = _script(MeanColour(), tmp_path / "sscd.pt")
    out = tmp_path / "run"
    argv = ["--model", tiny_folder, "--prompts", NEMO_CSV, "--methods", "cfg,guard", "--images", 2]
    argv += ["--seeds", "0,1", "--steps", 2, "--batch-prompts", 3, "--out", out]
    argv += ["--sscd", sscd, "--ground-truth", truth]
    assert _run(*argv) == 0
    captured = capsys.readouterr()
    assert "1 of 4 prompt(s) have no ground-truth image" in captured.err
    assert "not scored in this run: CLIP (add --clip); FID" in captured.err
    rows = read_rows(out)
    assert sorted((row["key"], row["method"]) for row in rows) == sorted(
        (key, method) for key in ("111", "222", "333", "444") for method in ("cfg", "guard")
    )
    for row in rows:
        assert row["images"] == [f"images/{row['method']}/{row['key']}/s{s}_{j}.png" for s in (0, 1) for j in (0, 1)]
        assert all((out / path).is_file() for path in row["images"])
        assert (row["sscd"] is None) == (row["key"] == "444") and "clip" not in row
        assert isinstance(row["flagged"], dict) and row["cleared"] is None
    assert {row["kind"] for row in rows} == {"verbatim", "template"}

    cfg = {row["key"]: row["sscd"] for row in rows if row["method"] == "cfg"}
    kept = {key for key, value in cfg.items() if value is not None and value > 0.7}
    verbatim = len(kept & {"111", "333"})
    note = (
        f"Prompts: those whose `cfg` SSCD exceeds 0.7: {len(kept)} of 4 prompts (verbatim {verbatim} of 2, "
        f"template {len(kept) - verbatim} of 2). 1 prompt(s) have no `cfg` SSCD and are left out."
    )
    assert note in captured.out and "CLIP: not scored in this run" in captured.out
    assert (out / "summary.md").read_text(encoding="utf-8") == captured.out
    per_prompt = (out / "per_prompt.csv").read_text(encoding="utf-8").splitlines()
    assert per_prompt[0] == "method,key,index,kind,sscd,clip,seconds,caption" and len(per_prompt) == 9
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["generation"]["steps"] == 2 and manifest["generation"]["model"] == str(tiny_folder.resolve())

    results = (out / "results.jsonl").read_bytes()
    stamps = {path: path.stat().st_mtime_ns for path in (out / "images").rglob("*.png")}
    assert _run(*argv) == 0  # everything is done: nothing generated, nothing appended
    assert (out / "results.jsonl").read_bytes() == results
    assert {path: path.stat().st_mtime_ns for path in (out / "images").rglob("*.png")} == stamps
    assert capsys.readouterr().out == captured.out

    argv[argv.index("--steps") + 1] = 3
    assert _run(*argv) == 2
    assert "other generation settings (steps 2 -> 3); use a new out_dir" in capsys.readouterr().err


def test_a_run_without_sscd_records_its_rows_and_rescore_adds_sscd_later(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", tiny_folder, "--prompts", NEMO_CSV, "--limit", 2, "--methods", "cfg,attenuation"]
    assert _run(*argv, "--images", 1, "--steps", 1, "--out", out) == 0
    assert "SSCD: not scored in this run" in capsys.readouterr().out
    assert len(read_rows(out)) == 4 and all("sscd" not in row for row in read_rows(out))
    truth = tmp_path / "truth"
    (truth / "222").mkdir(parents=True)  # a template prompt: several ground truths in a folder
    Image.new("RGB", (20, 20), (200, 40, 40)).save(truth / "111.png")
    for i, colour in enumerate(((40, 200, 40), (40, 40, 200))):
        Image.new("RGB", (20, 20), colour).save(truth / "222" / f"{i}.png")
    sscd = _script(MeanColour(), tmp_path / "sscd.pt")
    rescore = ["rescore", str(out), "--sscd", str(sscd), "--ground-truth", str(truth), "--threshold", "-1"]
    assert main([*rescore, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = read_rows(out)
    assert all(isinstance(row["sscd"], float) and len(row["sscd_per_image"]) == 1 for row in rows)
    assert "Prompts: those whose `cfg` SSCD exceeds -1.0: 2 of 2 prompts (verbatim 1 of 1, template 1 of 1)." in printed
    assert main(["rescore", str(tmp_path / "absent"), "--clip"]) == 2
    assert "absent has no finished rows to rescore" in capsys.readouterr().err


def test_batched_and_one_by_one_runs_save_the_same_images(tiny_folder, prompt_file, tmp_path, capsys):
    common = ["--model", tiny_folder, "--prompts", prompt_file, "--methods", "guard,somepalli", "--images", 2]
    common += ["--seeds", "0,1", "--steps", 2]
    assert _run(*common, "--out", tmp_path / "one", "--batch-prompts", 1) == 0
    assert _run(*common, "--out", tmp_path / "three", "--batch-prompts", 3) == 0
    assert "SSCD (add --sscd FILE --ground-truth DIR, or rescore later)" in capsys.readouterr().err
    one = sorted((tmp_path / "one" / "images").rglob("*.png"))
    assert len(one) == 3 * 2 * 2 * 2
    largest = 0
    for path in one:
        twin = tmp_path / "three" / path.relative_to(tmp_path / "one")
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (path, twin))
        largest = max(largest, int(np.abs(a - b).max()))
    assert largest <= 1  # equal up to float rounding of the batched kernels, then 8-bit rounding
    first = np.asarray(Image.open(one[0]), dtype=np.int16)
    assert np.abs(first - np.asarray(Image.open(one[1]), dtype=np.int16)).max() > 1  # images differ: can fail


def test_fid_and_presets_read_when_the_command_runs(tiny_folder, prompt_file, tmp_path, monkeypatch, capsys):
    presets = dict(guard.config.PRESETS, **{"cfg-strong": MappingProxyType({"method": "cfg", "guidance_scale": 9.0})})
    monkeypatch.setattr(guard.config, "PRESETS", MappingProxyType(presets))  # as another engineer adds presets
    references = tmp_path / "references"
    references.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(references / f"{i}.png")
    network = _script(PooledColour(), tmp_path / "inception.pt")
    out = tmp_path / "run"
    argv = ["--model", tiny_folder, "--prompts", prompt_file, "--methods", "cfg,cfg-strong", "--images", 2]
    argv += ["--steps", 1, "--out", out, "--fid", references, "--fid-model", network]
    assert _run(*argv) == 0
    printed = capsys.readouterr().out
    fid = json.loads((out / "fid.json").read_text())
    assert set(fid["methods"]) == {"cfg", "cfg-strong"} and fid["reference_images"] == 6
    assert fid["methods"]["cfg"]["images"] == 6 and fid["methods"]["cfg"]["fid"] > 0
    assert f"| cfg | {fid['methods']['cfg']['fid']:.2f} | 6 | 6 |" in printed
    assert json.loads((out / "run.json").read_text())["methods"]["cfg-strong"]["guidance_scale"] == 9.0
    assert "Prompts: all (no baseline filter)." in printed  # no SSCD, so no SSCD > 0.7 filter


def test_the_shipped_testbed_runs_through_the_command(prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "testbed", "--prompts", prompt_file, "--limit", 1, "--methods", "cfg", "--images", 1]
    assert _run(*argv, "--steps", 1, "--out", out) == 0
    (row,) = read_rows(out)
    assert row["caption"] == "a red circle on a blue background"
    assert Image.open(out / row["images"][0]).size == (32, 32)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "cfg,nonsense"], "--methods: unknown preset(s) nonsense; available: guard, attenuation"),
        (["--sscd", "x.pt"], "--sscd and --ground-truth go together"),
        (["--prompts", "sd9-everything"], "sd9-everything is neither a prompt set (sd1-memorized, sd1-verbatim"),
        (["--model", "no/such/folder/here"], "--model no/such/folder/here: no such folder, and not a hub id"),
        (["--fid", "."], "--fid REFERENCE_DIR and --fid-model FILE go together"),
        (["--baseline", "guard"], "--baseline guard: not among --methods (cfg)"),
        (["--seeds", "1,1"], "argument --seeds: expected distinct non-negative integers"),
    ],
    ids=["preset", "sscd-alone", "prompts", "model", "fid-alone", "baseline", "seeds"],
)
def test_user_errors_are_one_line_with_status_2(extra, message, tiny_folder, prompt_file, tmp_path, capsys):
    argv = {"--model": str(tiny_folder), "--prompts": str(prompt_file), "--methods": "cfg", "--out": str(tmp_path)}
    for name, value in zip(extra[::2], extra[1::2]):
        argv[name] = value
    flat = [item for pair in argv.items() for item in pair]
    if extra[0] == "--seeds":
        with pytest.raises(SystemExit) as exit_info:
            _run(*flat)
        code = exit_info.value.code
    else:
        code = _run(*flat)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith(PROG)]
    assert message in lines[-1] and lines[-1].startswith(f"{PROG}")
    assert "Traceback" not in captured.err


def test_sscd_needs_lists_with_laion_indices(tiny_folder, prompt_file, tmp_path, capsys):
    (tmp_path / "truth").mkdir()
    argv = ["--model", tiny_folder, "--prompts", prompt_file, "--out", tmp_path / "run"]
    argv += ["--sscd", _script(MeanColour(), tmp_path / "s.pt"), "--ground-truth", tmp_path / "truth"]
    assert _run(*argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"{PROG}: error: prompt 'a red circle on a blue background'") and "no LAION index" in error


# ------------------------------------------------------------------------------ many processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(tmp_path, argv, processes, environment=None, timeout=300):
    """``accelerate launch`` on the CPU: its torchrun launcher (--multi_gpu), gloo between the processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), **(environment or {})}
    env.pop("WORLD_SIZE", None)
    command = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", str(processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), "-m", "guard.evaluation", "run", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)


def test_accelerate_launch_is_killed_mid_run_and_resumes_with_every_row_once(tiny_folder, prompt_file, tmp_path):
    pytest.importorskip("accelerate")
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not on PATH")
    out = tmp_path / "run"
    argv = ["--model", tiny_folder, "--prompts", prompt_file, "--methods", "cfg,guard", "--images", 1]
    argv += ["--steps", 1, "--out", out, "--no-progress"]
    killed = _launch(tmp_path, argv, 2, {"GUARD_EVALUATION_KILL_BEFORE_ROW": "1:1"})  # process 1 dies at its 2nd row
    assert killed.returncode != 0, killed.stderr[-2000:]
    part = out / "parts" / "rank-1.jsonl"
    assert len(read_rows(out)) < 6 and len(part.read_text().splitlines()) == 1
    orphan = sorted((out / "images").rglob("*.png"))  # the killed row's image is on disk, its row is not
    assert len(orphan) > sum(len(row["images"]) for row in read_rows(out))

    resumed = _launch(tmp_path, argv, 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = read_rows(out)
    pairs = [(row["key"], row["method"]) for row in rows]
    assert sorted(pairs) == sorted((f"row{i}", m) for i in range(3) for m in ("cfg", "guard"))  # each exactly once
    assert len(part.read_text().splitlines()) > 1  # the killed process's part resumed
    assert not (out / "results.jsonl").exists()
    assert "| guard | unlabelled | 3 |" in resumed.stdout and (out / "summary.md").read_text() == resumed.stdout


def test_a_single_process_killed_mid_run_resumes_with_nothing_lost_or_duplicated(tiny_folder, prompt_file, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", tiny_folder, "--prompts", prompt_file, "--methods", "cfg,guard", "--images", 2, "--steps", 1]
    argv += ["--out", out, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GUARD_EVALUATION_KILL_BEFORE_ROW": "0:2", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    killed = subprocess.run(
        [sys.executable, "-m", "guard.evaluation", "run", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL before appending its third row
    assert [(row["key"], row["method"]) for row in read_rows(out)] == [("row0", "cfg"), ("row0", "guard")]
    assert (out / "images" / "cfg" / "row1" / "s0_1.png").is_file()  # the killed row's images, without its row
    assert _run(*argv) == 0
    pairs = [(row["key"], row["method"]) for row in read_rows(out)]
    assert sorted(pairs) == sorted((f"row{i}", m) for i in range(3) for m in ("cfg", "guard"))


def test_a_user_error_under_the_module_has_no_traceback(tiny_folder, prompt_file, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "guard.evaluation", "run", "--model", str(tiny_folder), "--prompts", str(prompt_file)]
        + ["--methods", "guard,wen-unknown", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{PROG}: error: --methods: unknown preset(s) wen-unknown")


def test_an_sdxl_folder_runs_through_the_command_and_other_pipelines_are_refused(prompt_file, tmp_path, capsys):
    """The folder's model_index.json picks the pipeline: SDXL folders load as the SDXL GUARD pipeline."""
    from diffusers import StableDiffusionXLPipeline
    from sampler_utils import tiny_sdxl_components

    from guard.evaluation.command import load_model
    from guard.pipeline_sdxl import StableDiffusionXLGuardPipeline

    folder = tmp_path / "sdxl"
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(folder)
    assert isinstance(load_model(str(folder), torch.device("cpu"), torch.float32), StableDiffusionXLGuardPipeline)
    out = tmp_path / "run"
    argv = ["--model", folder, "--prompts", prompt_file, "--methods", "cfg,guard", "--images", 1, "--steps", 2]
    assert _run(*argv, "--out", out) == 0
    rows = read_rows(out)
    assert len(rows) == 6 and all((out / row["images"][0]).is_file() for row in rows)
    assert all(isinstance(row["flagged"], dict) for row in rows if row["method"] == "guard")

    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert _run(*argv, "--out", tmp_path / "other") == 2
    err = capsys.readouterr().err
    assert "a StableDiffusionXLImg2ImgPipeline; the evaluation runs StableDiffusionPipeline" in err
    assert "Traceback" not in err
