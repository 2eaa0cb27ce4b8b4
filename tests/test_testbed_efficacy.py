"""guard.testbed.efficacy: the selection rule (lowest replication among settings within 15% of CFG's alignment), and
the testbed's evaluation through guard.evaluation's runner with its pixel metrics as scorers."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from guard.evaluation.prompts import PromptRecord
from guard.evaluation.results import read_rows
from guard.pipeline import StableDiffusionGuardPipeline
from guard.testbed import default_guard_config, load_pipeline, memorized_items, plain_prompts
from guard.testbed.efficacy import (
    alignment_rates,
    alignment_scorer,
    evaluate_method,
    flagged_shares,
    is_eligible,
    replication_scorer,
    run_folder_name,
    sample_images,
    score_samples,
    select_best,
)


def _result(name, own, memorized, plain):
    return SimpleNamespace(
        name=name,
        own_ssim=np.array([own]),
        memorized_alignment=np.array([memorized]),
        plain_alignment=np.array([plain]),
    )


def test_lowest_replication_within_the_alignment_budget_wins():
    cfg = _result("cfg", 0.95, 0.8, 1.0)
    keeps = _result("keeps", 0.7, 0.8, 0.9)
    better = _result("better", 0.5, 0.7, 0.86)
    breaks_plain = _result("breaks plain", 0.1, 0.9, 0.84)
    breaks_memorized = _result("breaks memorized", 0.1, 0.67, 1.0)
    assert [is_eligible(r, cfg) for r in (keeps, better, breaks_plain, breaks_memorized)] == [True, True, False, False]
    assert select_best([keeps, breaks_plain, better, breaks_memorized], cfg) is better
    assert select_best([breaks_plain, breaks_memorized], cfg) is None


# ---------------------------------------------------------------- one evaluation loop: the runner


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def testbed():
    pipe = load_pipeline(pipeline_class=StableDiffusionGuardPipeline)
    return pipe, memorized_items()[:2], plain_prompts(2)


class CountingPipe:
    """The testbed pipeline, counting its calls (a resumed run makes none)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.pipe(*args, **kwargs)


def test_evaluate_method_goes_through_the_runner_with_the_same_scores_as_direct_sampling(testbed, tmp_path):
    pipe, items, plain = testbed
    config, seeds, steps, threshold = default_guard_config(), [0, 3], 2, 0.5
    counting = CountingPipe(pipe)
    result = evaluate_method(counting, "GUARD (default)", config, items, plain, seeds, steps, threshold, tmp_path)
    assert counting.calls == 2  # one batched call for the memorized prompts, one for the plain ones

    training = np.stack([item.image for item in items])
    memorized, memorized_report = sample_images(pipe, [item.caption for item in items], config, seeds, steps)
    plain_images, _ = sample_images(pipe, plain, config, seeds, steps)
    direct = [score_samples(memorized[i], item, training, threshold) for i, item in enumerate(items)]
    np.testing.assert_array_equal(result.own_ssim, np.stack([d["own_ssim"] for d in direct]))
    np.testing.assert_array_equal(result.copied, np.stack([d["copied"] for d in direct]).astype(float))
    np.testing.assert_array_equal(
        result.plain_alignment,
        [[check["all_ok"] for check in alignment_rates(plain_images[i], p)["per_image"]] for i, p in enumerate(plain)],
    )
    assert result.memorized_flags == [flagged_shares(memorized_report, i) for i in range(len(items))]
    assert config.gate_threshold is not None  # the shipped default gates: the cleared images are recorded
    np.testing.assert_array_equal(result.memorized_cleared, memorized_report.cleared.numpy().astype(float))
    assert result.memorized_images.shape == (2, 2, 32, 32, 3)
    assert np.abs(result.memorized_images - memorized).max() <= 0.5 / 255 + 1e-6  # the saved PNGs

    rows = read_rows(tmp_path)
    assert {row["method"] for row in rows} == {"guard-default"} and len(rows) == 4
    assert set(rows[0]["alignment"]) == {"background_ok", "colour_ok", "shape_ok", "all_ok"}
    again = evaluate_method(counting, "GUARD (default)", config, items, plain, seeds, steps, threshold, tmp_path)
    assert counting.calls == 2  # resumed from the run directory: nothing sampled again
    np.testing.assert_array_equal(again.own_ssim, result.own_ssim)
    assert again.plain_flags == result.plain_flags


def test_testbed_scorers_follow_the_runners_interface(testbed):
    _, items, _ = testbed
    copies = replication_scorer(items, 0.5)(PromptRecord(items[0].caption), [items[0].image] * 2)
    assert copies["own_ssim"] == pytest.approx([1.0, 1.0]) and copies["copied"].tolist() == [True, True]
    assert replication_scorer(items, 0.5)(PromptRecord("a red circle on a blue background"), [items[0].image]) == {}
    fields = alignment_scorer()(PromptRecord(items[0].caption), [items[0].image])
    assert set(fields["alignment"]) == {"background_ok", "colour_ok", "shape_ok", "all_ok"}
    assert run_folder_name("GUARD (published) s=7.5") == "guard-published-s-7.5"


def test_a_setting_label_names_the_gate_detector_and_the_spike_tokens():
    from guard.config import GuardConfig
    from guard.testbed.evaluate import _describe

    base = GuardConfig(guidance_scale=2.0, spike_threshold=4.0, spike_scale=0.45, repulsion_scale=1.0)
    assert _describe(base.replace(gate_threshold=0.95)) == "guard s=2 tau=4 alpha=0.45 r=1 gate=0.95"
    linear = base.replace(spike_tokens="first-step", gate_detector="linear", gate_weights=(0.0, -8.2, -7.7),
                          gate_threshold=-26.6133)  # fmt: skip
    assert _describe(linear) == "guard s=2 tau=4 alpha=0.45 r=1 first-step tokens gate=linear@-26.61"
