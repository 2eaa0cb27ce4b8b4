"""The ``guard`` command end to end on the shipped testbed (few steps), and its user errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from guard.cli import CLIError, _guard_config, build_parser, folder_pipeline_class, guard_pipeline_class, main
from guard.testbed import default_guard_config
from guard.testbed.demo import LEGEND, sample_caption
from guard.visualize import enlarge, image_grid


def test_generate_writes_an_enlarged_png_and_reports_tokens(tmp_path, capsys):
    out = tmp_path / "sample.png"
    assert (
        main(["generate", "a red circle on a blue background", "--steps", "2", "--images", "2", "--out", str(out)]) == 0
    )
    image = Image.open(out)
    assert image.size == (2 * 256, 256)  # two 32x32 samples, enlarged for viewing
    printed = capsys.readouterr().out
    assert "circle" in printed and f"wrote {out}" in printed


def test_generate_with_cfg_and_overrides(tmp_path):
    out = tmp_path / "cfg.png"
    args = [
        "generate",
        "a blue square on a white background",
        "--method",
        "cfg",
        "--steps",
        "2",
        "--images",
        "1",
        "--guidance-scale",
        "3",
        "--seed",
        "7",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert np.asarray(Image.open(out)).std() > 0  # not a blank canvas


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memorized | CFG" in printed and "memorized | GUARD" in printed and "plain | GUARD" in printed
    width, height = Image.open(out).size
    assert width > 400
    # 8 prompt rows of 112 px cells with captions, a header, and the legend below them
    assert height > 16 + 8 * (112 + 16) + 3 * 13


def test_demo_takes_setting_overrides(tmp_path, capsys):
    out = tmp_path / "demo.png"
    argv = [
        "demo",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--out",
        str(out),
        "--spike-threshold",
        "3.5",
        "--spike-scale",
        "0.4",
        "--repulsion-scale",
        "0.25",
        "--gate-detector",
        "cosine",
        "--gate-threshold",
        "0.9",
        "--spike-tokens",
        "first-step",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "r=0.25 (cosine) tau=3.5 alpha=0.4 first-step tokens gate: first-step cosine > 0.9;" in printed
    assert "memorization gate:" in printed and "of 5 memorized-prompt samples" in printed


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "x", "--model", "/no/such/folder"], "no model folder at /no/such/folder"),
        (["demo", "--repulsion-scale", "-1"], "repulsion_scale"),
        (["generate", "x", "--out", "sample.jpg"], "--out must name a .png file"),
        (["generate", "x", "--spike-scale", "-1"], "spike_scale must be >= 0"),
        (["generate", "x", "--method", "cfg", "--gate-threshold", "0.9"], "needs method 'guard'"),
        (["generate", "x", "--device", "gpu"], "unknown device 'gpu'"),
        (["generate", "x", "--device", "cuda:7"], "--device cuda:7"),
        (["demo", "--device", "meta"], "--device meta"),
        (["generate", "x", "--blocks", "down_blocks.7"], "'down_blocks.7' matches no cross-attention"),
        (["generate", "x", "--blocks", "mid_block,mid_block"], "duplicates"),
        (["generate", "x", "--gate-threshold", "1.5", "--gate-detector", "cosine"], "must be in [-1, 1]"),
        (["generate", "x", "--gate-detector", "wen"], "--gate-detector wen: give its --gate-threshold"),
        (
            ["generate", "x", "--gate-threshold", "0.9", "--gate-detector", "cosine", "--gate-weights", "1,0,0"],
            "gate_weights (wen, cosine",
        ),  # fmt: skip
        (
            ["generate", "x", "--gate-threshold", "2", "--gate-detector", "linear", "--gate-weights", "0,0,0"],
            "must not all be 0",
        ),  # fmt: skip
        (["generate", "x", "--gate-threshold", "off", "--gate-steps", "2"], "switches the gate off"),
        (["generate", "x", "--method", "attenuation", "--gate-steps", "2"], "has no gate"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("guard: error: ") and err.count("\n") == 1


def test_blocks_option_chooses_the_attenuated_layers(tmp_path, capsys):
    out = tmp_path / "mid.png"
    argv = ["generate", "a red circle on a blue background", "--steps", "1", "--images", "1", "--out", str(out)]
    assert main(argv + ["--blocks", "mid_block", "--gate-threshold", "off"]) == 0
    printed = capsys.readouterr().out
    assert "1 attenuated layer(s)" in printed and "down_blocks" not in printed.split("step  w_neg")[0]


def test_the_command_prints_no_torchvision_notice(tmp_path):
    """transformers' "requires torchvision (not installed)" notice is noise to a guard user."""
    env = {key: value for key, value in os.environ.items() if key != "GUARD_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "guard.cli", "generate", "a red circle on a blue background", "--steps", "1",
         "--images", "1", "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stderr and "Loading pipeline components" not in done.stderr


def test_demo_captions_name_the_image_a_sample_copies():
    names = ["astronaut", "coffee"]
    assert sample_caption("CFG", 0.94, 0, 0.94, 0, 0.5, names) == "CFG copy 0.94"
    # Low own-image SSIM, but the nearest training image is another memorized one: a copy, not a success.
    assert sample_caption("GUARD", 0.2, 1, 0.9, 0, 0.5, names) == "GUARD copy of coffee"
    assert sample_caption("GUARD*", 0.2, 0, 0.3, 0, 0.5, names) == "GUARD* SSIM 0.20"
    assert sample_caption("CFG", None, 1, 0.8, None, 0.5, names, aligned=True) == "CFG copy of coffee"
    assert sample_caption("CFG", None, 1, 0.3, None, 0.5, names, aligned=False) == "CFG off"
    assert any("GUARD*" in line for line in LEGEND) and any("off" in line for line in LEGEND)


def test_a_folder_that_is_not_a_pipeline_is_refused(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "x", "--method", "nope"],
        ["generate", "x", "--steps", "0"],
        ["generate", "x", "--images", "two"],
        ["generate", "x", "--guidance-scale", "nan"],
        ["demo", "--seeds", "-1"],
        ["generate", "x", "--gate-threshold", "maybe"],
        ["generate", "x", "--gate-detector", "nope"],
        ["generate", "x", "--gate-weights", "1,2"],
        ["generate", "x", "--gate-steps", "0"],
    ],
)
def test_bad_options_are_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_grid_layout_and_nearest_neighbour_enlargement():
    tile = np.zeros((4, 4, 3), dtype=np.float32)
    tile[:2] = 1.0
    big = np.asarray(enlarge(tile, 8))
    assert big.shape == (8, 8, 3) and set(np.unique(big)) == {0, 255}  # no blurred in-between values
    grid = image_grid([[tile, tile], [tile]], cell=8, column_labels=["a", "b"], captions=[["x", "y"], ["z"]])
    assert grid.size == (16, 16 + 2 * (8 + 16))
    with_legend = image_grid([[tile, tile]], cell=64, legend=["GUARD*: cleared by the gate", "off: misaligned"])
    assert with_legend.size[1] > 64 + 2 * 13  # two legend lines below the row
    assert np.asarray(with_legend)[64:].min() < 128  # and they are drawn
    with pytest.raises(ValueError, match="non-empty row"):
        image_grid([])


def test_every_method_runs_at_the_testbed_guidance_scale_and_the_gate_can_be_set_or_switched_off():
    shipped = default_guard_config()
    parser = build_parser()
    for method in ("cfg", "attenuation", "ren", "guard"):
        config = _guard_config(parser.parse_args(["generate", "x", "--method", method]), is_testbed=True)
        assert config.method == ("guard" if method == "guard" else config.method)
        assert config.guidance_scale == shipped.guidance_scale  # not the published 7.5
    assert (
        _guard_config(parser.parse_args(["generate", "x", "--method", "cfg"]), is_testbed=False).guidance_scale == 7.5
    )
    gated = _guard_config(parser.parse_args(["generate", "x", "--gate-threshold", "0.8"]), is_testbed=True)
    assert gated.gate_threshold == 0.8
    off = _guard_config(parser.parse_args(["generate", "x", "--gate-threshold", "off"]), is_testbed=True)
    assert off.gate_threshold is None and off.gate_detector == "cosine" and off.gate_weights is None
    assert off.replace(**{k: getattr(shipped, k) for k in GATE_FIELDS}) == shipped


GATE_FIELDS = ("gate_threshold", "gate_detector", "gate_steps", "gate_weights")


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--gate-detector", "spike_share", "--gate-threshold", "0.6"], ("spike_share", 0.6, 1, None)),
        (["--gate-detector", "wen", "--gate-threshold", "3", "--gate-steps", "2"], ("wen", 3.0, 2, None)),
        (
            ["--gate-detector", "linear", "--gate-threshold", "-26.5", "--gate-weights", "0,-8.2,-7.7"],
            ("linear", -26.5, 1, (0.0, -8.2, -7.7)),
        ),
    ],
)
def test_the_gate_options_choose_the_detector_its_threshold_weights_and_steps(options, expected):
    config = _guard_config(build_parser().parse_args(["generate", "x", *options]), is_testbed=True)
    assert (config.gate_detector, config.gate_threshold, config.gate_steps, config.gate_weights) == expected
    # From a linear gate back to the cosine: the weights go with the linear detector.
    back = _guard_config(
        build_parser().parse_args(["generate", "x", "--gate-detector", "cosine", "--gate-threshold", "0.9"]),
        is_testbed=True,
    )
    assert back.gate_weights is None and back.gate_detector == "cosine"


# ----------------------------------------------------------------------------------------------
# SD or SDXL, chosen by the folder's model_index.json


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Folders holding a tiny SD and a tiny SDXL pipeline, as save_pretrained writes them."""
    from diffusers import StableDiffusionXLPipeline
    from sampler_utils import stock_pipeline, tiny_sdxl_components

    root = tmp_path_factory.mktemp("models")
    stock_pipeline().save_pretrained(root / "sd")
    # A stock SDXL pipeline: two CLIP text encoders, SDXL's UNet layout (text_time added conditioning).
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(root / "sdxl")
    return root


def _set_class_name(folder, name):
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = name
    index_file.write_text(json.dumps(index))


def test_model_index_class_chooses_the_guard_pipeline(saved_models, tmp_path):
    from guard import StableDiffusionGuardPipeline, StableDiffusionXLGuardPipeline

    assert json.loads((saved_models / "sd" / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionPipeline"
    )
    assert folder_pipeline_class(saved_models / "sd") is StableDiffusionGuardPipeline
    assert folder_pipeline_class(saved_models / "sdxl") is StableDiffusionXLGuardPipeline
    # Folders a GUARD pipeline saved name the GUARD class.
    assert guard_pipeline_class("StableDiffusionGuardPipeline", "x") is StableDiffusionGuardPipeline
    assert guard_pipeline_class("StableDiffusionXLGuardPipeline", "x") is StableDiffusionXLGuardPipeline
    for name in ("StableDiffusionXLImg2ImgPipeline", "FluxPipeline", None):
        with pytest.raises(CLIError, match="guard generate runs StableDiffusionPipeline") as error:
            guard_pipeline_class(name, "somewhere")
        assert (name or "names no pipeline class") in str(error.value)


def test_generate_on_an_sdxl_folder_runs_the_sdxl_guard_pipeline(saved_models, tmp_path, capsys, monkeypatch):
    from guard import StableDiffusionXLGuardPipeline

    loaded = []
    real = StableDiffusionXLGuardPipeline.from_pretrained.__func__
    monkeypatch.setattr(
        StableDiffusionXLGuardPipeline,
        "from_pretrained",
        classmethod(lambda cls, *args, **kwargs: loaded.append(cls) or real(cls, *args, **kwargs)),
    )
    out = tmp_path / "sdxl.png"
    argv = ["generate", "a red circle on a blue background", "--model", str(saved_models / "sdxl"), "--steps", "2",
            "--images", "2", "--guidance-scale", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert loaded == [StableDiffusionXLGuardPipeline]
    image = Image.open(out)
    assert image.size == (2 * 16, 16)  # two 16 px samples (8x8 latents, VAE factor 2) side by side
    assert np.asarray(image).std() > 0
    printed = capsys.readouterr().out
    assert "circle" in printed and f"wrote {out}" in printed


def test_generate_on_an_sd_folder_runs_the_sd_guard_pipeline(saved_models, tmp_path, capsys):
    out = tmp_path / "sd.png"
    argv = ["generate", "a red circle", "--model", str(saved_models / "sd"), "--steps", "1", "--images", "1",
            "--method", "cfg", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert Image.open(out).size == (16, 16)


@pytest.mark.parametrize("class_name", ["StableDiffusionXLImg2ImgPipeline", "FluxPipeline"])
def test_generate_refuses_other_pipelines_in_one_line(saved_models, tmp_path, capsys, class_name):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text((saved_models / "sdxl" / "model_index.json").read_text())
    _set_class_name(folder, class_name)
    assert main(["generate", "x", "--model", str(folder), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guard: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"{folder} is a {class_name}" in err and "StableDiffusionXLPipeline (SDXL)" in err


@pytest.mark.parametrize("index", ["{not json", "[1, 2]", '{"vae": ["diffusers", "AutoencoderKL"]}'])
def test_a_broken_model_index_is_a_one_line_error(tmp_path, capsys, index):
    (tmp_path / "model_index.json").write_text(index)
    assert main(["generate", "x", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guard: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "model_index.json" in err or "names no pipeline class" in err


def test_a_hub_id_is_dispatched_by_its_model_index(monkeypatch):
    from diffusers import DiffusionPipeline

    from guard import StableDiffusionGuardPipeline, StableDiffusionXLGuardPipeline
    from guard.cli import hub_pipeline_class

    indexes = {"org/sd": "StableDiffusionPipeline", "org/sdxl": "StableDiffusionXLPipeline", "org/flux": "FluxPipeline"}

    def load_config(name, *args, **kwargs):
        if name not in indexes:
            raise OSError(f"{name} is not on the hub")
        return {"_class_name": indexes[name]}

    monkeypatch.setattr(DiffusionPipeline, "load_config", load_config)
    assert hub_pipeline_class("org/sd") is StableDiffusionGuardPipeline
    assert hub_pipeline_class("org/sdxl") is StableDiffusionXLGuardPipeline
    with pytest.raises(CLIError, match="'org/flux' is a FluxPipeline; guard generate runs"):
        hub_pipeline_class("org/flux")
    with pytest.raises(CLIError, match="could not load 'org/none' from the hub or its cache"):
        hub_pipeline_class("org/none")
