"""guard.evaluation.generation: one CPU generator per image, so a batch of prompts equals one-by-one generation."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sampler_utils import tiny_components

from guard.config import GuardConfig
from guard.evaluation.generation import PipelineGenerator, image_generators, image_seed, pipeline_generate_fn
from guard.pipeline import StableDiffusionGuardPipeline

PROMPTS = ["a red circle on a blue background", "a green square by the yellow triangle", "a cat"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_each_image_has_its_own_seed_and_one_image_per_seed_keeps_the_seed():
    assert [image_seed(seed, j, 4) for seed in (0, 1) for j in range(4)] == list(range(8))
    assert [image_seed(seed, 0, 1) for seed in (0, 5, 9)] == [0, 5, 9]
    generators = image_generators(2, [3, 7], 2)
    assert [g.initial_seed() for g in generators] == [6, 7, 14, 15, 6, 7, 14, 15]
    assert all(g.device.type == "cpu" for g in generators)


def test_the_pipeline_gets_one_generator_per_image_and_the_images_are_split_per_prompt():
    seen = {}

    def pipe(prompt, **kwargs):
        seen.update(kwargs, prompt=prompt)
        rows = len(prompt) * kwargs["num_images_per_prompt"]
        return SimpleNamespace(images=[Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(rows)])

    config = object()
    generations = PipelineGenerator(pipe, num_inference_steps=50).batch(["a", "b"], config, [11, 12], 3)
    assert seen["prompt"] == ["a", "b"] and seen["guard_config"] is config and seen["num_inference_steps"] == 50
    assert seen["num_images_per_prompt"] == 6
    assert [g.initial_seed() for g in seen["generator"]] == [33, 34, 35, 36, 37, 38] * 2
    assert [[image.getpixel((0, 0))[0] for image in g.images] for g in generations] == [
        [0, 1, 2, 3, 4, 5],
        [6, 7, 8, 9, 10, 11],
    ]
    assert generations[0].info == {}  # no GUARD report from this pipeline
    single = pipeline_generate_fn(pipe)("a cat", config, 5, 2)
    assert len(single) == 2 and [g.initial_seed() for g in seen["generator"]] == [10, 11]
    with pytest.raises(ValueError, match="set per call"):
        PipelineGenerator(pipe, generator=torch.Generator())


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = StableDiffusionGuardPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "method",
    ["cfg", "guard", "somepalli", GuardConfig(gate_threshold=0.99)],
    ids=["cfg", "guard", "somepalli-noise-from-the-generator", "guard-gate"],
)
def test_a_batch_of_prompts_equals_one_by_one_generation(tiny_pipe, method):
    generate = PipelineGenerator(tiny_pipe, num_inference_steps=3, output_type="np")
    together = generate.batch(PROMPTS, method, [0, 3], 2)
    alone = [generate.batch([prompt], method, [seed], 2)[0] for prompt in PROMPTS for seed in (0, 3)]
    batched = np.stack([image for generation in together for image in generation.images])
    separate = np.stack([image for generation in alone for image in generation.images])
    assert batched.shape == (12, 16, 16, 3)
    np.testing.assert_allclose(batched, separate, rtol=0, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3  # each image its own noise: the check can fail
    for index, generation in enumerate(together):
        per_seed = alone[2 * index].info, alone[2 * index + 1].info
        assert generation.info["cleared"] == (
            None if per_seed[0]["cleared"] is None else per_seed[0]["cleared"] + per_seed[1]["cleared"]
        )
        assert set(generation.info["flagged"]) == set(per_seed[0]["flagged"]) | set(per_seed[1]["flagged"])
