"""guard.evaluation.fid: torchmetrics' FID with a user-named TorchScript feature network, checked against the
closed form and against the NumPy/SciPy Frechet distance; FID per method of a run and its table."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from guard.evaluation import FIDScorer, evaluate_prompts, fid_by_method, frechet_distance, load_feature_network
from guard.evaluation.fid import FeatureNetwork, fid_batch, reference_images
from guard.evaluation.summary import summarise


class Pooled(torch.nn.Module):
    """Stand-in Inception called like NVIDIA's file: 2x2 average-pooled colours with ``return_features``."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(img.float() / 255.0, 2).flatten(1)
        return pooled if return_features else pooled[:, :1]


class Plain(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def _images(n, mean, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.normal(mean, 40, (24, 24, 3)), 0, 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "inception.pt"
    torch.jit.save(torch.jit.script(Pooled()), str(path))
    return load_feature_network(path)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(mu1, np.diag(var1), mu2[:2], np.diag(var2[:2]))


def test_torchmetrics_and_the_scipy_fallback_agree(network):
    pytest.importorskip("torchmetrics")
    references, close, far = _images(40, 120, 0), _images(30, 120, 1), _images(30, 160, 2)
    metric = FIDScorer(network, references, backend="torchmetrics", progress=False, batch_size=16)
    fallback = FIDScorer(network, references, backend="scipy", progress=False, batch_size=7)
    for images in (close, far):
        assert metric.score(images) == pytest.approx(fallback.score(images), rel=1e-4, abs=1e-7)
    assert metric.score(far) > 10 * metric.score(close) > 0
    assert abs(metric.score(references)) < 1e-5
    assert FIDScorer(network, references, progress=False).backend == "torchmetrics"  # "auto" picks it


def test_the_feature_network_is_a_named_torchscript_file(network, tmp_path):
    assert network.return_features and network.num_features == 12
    plain_path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(Plain()), str(plain_path))
    plain = load_feature_network(plain_path)
    assert not plain.return_features and plain.num_features == 3
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_feature_network(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_feature_network(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match=r"must return \(2, D\) features"):
        FeatureNetwork(torch.nn.Flatten(0))
    batch = fid_batch([Image.new("RGB", (64, 32), (10, 20, 30)), Image.new("L", (299, 299))])
    assert batch.shape == (2, 3, 299, 299) and batch.dtype == torch.uint8 and batch[0, :, 0, 0].tolist() == [10, 20, 30]


def test_fid_per_method_of_a_run_goes_into_its_table(network, tmp_path):
    references = tmp_path / "references"
    (references / "nested").mkdir(parents=True)
    for i, image in enumerate(_images(8, 120, 3)):
        image.save(references / ("nested" if i % 2 else "") / f"{i}.png")
    assert len(reference_images(references)) == 8
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds 0 image"):
        reference_images(tmp_path / "empty")

    means = {"close": 120, "far": 200}
    generate = lambda prompt, method, seed, n: _images(n, means[method], seed + len(prompt))  # noqa: E731
    out = tmp_path / "run"
    evaluate_prompts(generate, ["a", "bb", "ccc"], ["close", "far"], out_dir=out, num_images=2, progress=False)
    scorer = FIDScorer(network, reference_images(references), progress=False)
    results = fid_by_method(out, scorer, description={"reference": "refs", "feature_network": "inception.pt"})
    assert set(results) == {"close", "far"} and results["far"]["fid"] > results["close"]["fid"]
    assert results["close"]["images"] == 6
    record = json.loads((out / "fid.json").read_text())
    assert record["reference_images"] == 8 and record["backend"] == scorer.backend
    table = summarise(out, write=False)
    assert f"| far | {results['far']['fid']:.2f} | 6 | 8 |" in table and "against `refs` with `inception.pt`" in table
    evaluate_prompts(generate, ["a", "bb", "ccc", "dddd"], ["close"], out_dir=out, num_images=2, progress=False)
    assert "Stale, recompute it: `close` (computed on 6 images, the run now has 8)" in summarise(out, write=False)
