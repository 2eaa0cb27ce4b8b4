"""The README's code runs as written (on a tiny local pipeline saved first), and its Layout matches the tree."""

import re
from pathlib import Path

import pytest
from sampler_utils import tiny_components, tiny_sdxl_components

from guard import StableDiffusionGuardPipeline, StableDiffusionXLGuardPipeline

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "CompVis/stable-diffusion-v1-4"
HUB_ID_XL = "stabilityai/stable-diffusion-xl-base-1.0"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny SD-shaped pipeline saved as a local folder, standing in for the hub id the README names."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    StableDiffusionGuardPipeline(**tiny_components()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_xl_folder(tmp_path_factory):
    """A tiny SDXL-shaped pipeline saved as a local folder, standing in for SDXL base's hub id."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    StableDiffusionXLGuardPipeline(**tiny_sdxl_components()).save_pretrained(folder)
    return folder


def test_the_readme_code_runs_in_order(tiny_folder, tiny_xl_folder, tmp_path, monkeypatch):
    blocks = python_blocks(REPO / "README.md")
    assert len(blocks) == 4 and all(HUB_ID not in block for block in blocks[1:])
    assert HUB_ID_XL in blocks[1] and "torch_dtype" not in "".join(blocks)  # diffusers' current keyword is dtype=
    monkeypatch.chdir(tmp_path)  # the first blocks save guarded.png and guarded_xl.png
    namespace: dict = {}

    def run(block):
        block = block.replace(HUB_ID_XL, str(tiny_xl_folder)).replace(HUB_ID, str(tiny_folder))
        exec(compile(block, "README.md", "exec"), namespace)

    run(blocks[0])  # the pipeline, from the (stand-in) hub id
    assert (tmp_path / "guarded.png").is_file()
    assert namespace["out"].report.num_steps == 50 and len(namespace["out"].images) == 4
    run(blocks[1])  # the SDXL pipeline, from its (stand-in) hub id
    assert (tmp_path / "guarded_xl.png").is_file() and namespace["out_xl"].report.num_steps == 30
    assert namespace["out_xl"].report.layer_names[0].startswith("down_blocks.1.")
    run(blocks[2])  # a loop of one's own, on the SD pipeline's parts
    assert set(namespace["spike_counts"]) and namespace["x"].shape == (2, 4, 8, 8)
    assert namespace["x"].isfinite().all()
    run(blocks[3])  # the kernel on its own
    assert namespace["out"].shape == namespace["q"].shape and namespace["stats"].spikes[1].any()
    assert not namespace["stats"].spikes[0].any()


def test_the_testbed_readme_code_runs():
    blocks = python_blocks(REPO / "guard" / "testbed" / "README.md")
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "guard/testbed/README.md", "exec"), namespace)


def test_the_layout_section_names_every_module_and_nothing_else():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    layout = re.search(r"## Layout\n.*?```\n(.*?)```", text, flags=re.S).group(1)
    listed, folder = set(), None
    for line in layout.splitlines():
        name = line.split()[0]
        if not line.startswith(" "):
            folder = name.rstrip("/") if name.endswith("/") else None
            listed.add(name.rstrip("/"))
        elif folder is not None:
            listed.add(f"{folder}/{name.rstrip('/')}")
    for name in listed:
        assert (REPO / name).exists(), f"the README's Layout names {name}, which is not in the tree"
    for package in ("guard_kernels", "guard"):
        modules = {f"{package}/{p.name}" for p in (REPO / package).glob("*.py") if p.name != "__init__.py"}
        modules |= {f"{package}/{p.name}" for p in (REPO / package).iterdir() if (p / "__init__.py").is_file()}
        assert modules <= listed, f"not in the README's Layout: {sorted(modules - listed)}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = re.search(
        r"```bash\n(pip install torch==2\.13\.0 -e \"\.\[test\]\" && python -m pytest tests)\n```", readme
    )
    assert command, "the README lost its test command"
    assert command.group(1) in (REPO / ".ci" / "run").read_text(encoding="utf-8")
