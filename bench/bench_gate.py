"""What the memorization gate buys: whole runs of GUARD with the gate against CFG, and one attenuated layer.

1. Runs: ``StableDiffusionGuardPipeline`` on an SD-shaped model (random weights, 30 DDIM steps,
   latents out), per image, for CFG, GUARD without a gate, and GUARD with the gate deciding at
   the first step that every image is clean (``non-memorized``: after the decision each image
   runs CFG's two rows), that none is (``memorized``: GUARD's three rows throughout), and half
   of them (``mixed``). The decisions are set through the threshold (cosine -1, 1, and the
   batch's median first-step cosine), so the timing measures what the gate does, not what a
   random model scores. Target: non-memorized <= 1.05x CFG.
2. Layer: SD 1.5's 64x64 cross-attention layer (batch 3 = one image's GUARD rows, spike rule on
   the middle row), the layer's own SDPA processor against GUARD's processor as the pipeline
   runs it (spike rows a slice: the other rows through SDPA, statistics for the spike row) and
   with the spike rows given as a mask (every row through the kernel, as before). Target on the
   CPU: <= 1.2x SDPA.

Run: ``python bench/bench_gate.py [--model small] [--repeats 5]`` (markdown tables), or
``python -m pytest bench/bench_gate.py`` (pytest-benchmark).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guard.attention import attenuate_cross_attention  # noqa: E402
from guard.config import GuardConfig  # noqa: E402
from guard.pipeline import StableDiffusionGuardPipeline  # noqa: E402
from guard.testbed.tokenizer import build_tokenizer  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a green square by the yellow triangle",
           "a white triangle on a black background", "a blue square on a red background"]  # fmt: skip
STEPS = 30
_SD_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
MODELS = {
    # SD 1.x's block layout at reduced widths and resolution, so that 30 steps run on a CPU.
    "small": dict(sample_size=32, block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=16,
                  cross_attention_dim=128, attention_head_dim=4, **_SD_BLOCKS),
    "tiny": dict(sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3,
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=2),
}  # fmt: skip
RUNS = ("cfg", "guard", "guard, first-step tokens", "non-memorized", "mixed", "memorized")


def build_pipeline(model: str) -> StableDiffusionGuardPipeline:
    unet_config = MODELS[model]
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=unet_config["cross_attention_dim"], intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)  # fmt: skip
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionGuardPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=UNet2DConditionModel(**unet_config).eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_configs(pipe, latents) -> dict[str, GuardConfig]:
    """The runs' settings; the mixed threshold is the batch's median first-step cosine."""
    first = pipe(PROMPTS, latents=latents, num_inference_steps=STEPS, output_type="latent", callback_on_step_end=_stop)
    threshold = float(first.report.detection.cosine.median())
    return {
        "cfg": GuardConfig.preset("cfg"),
        "guard": GuardConfig(),
        "guard, first-step tokens": GuardConfig(spike_tokens="first-step"),
        "non-memorized": GuardConfig(gate_threshold=-1.0),
        "mixed": GuardConfig(gate_threshold=threshold),
        "memorized": GuardConfig(gate_threshold=1.0),
    }


def _stop(pipeline, step, timestep, tensors):
    pipeline._interrupt = True
    return {}


def measure_runs(model: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per image of a whole run, rounds interleaving the settings (shared-machine load hits all)."""
    pipe = build_pipeline(model)
    size = pipe.unet.config.sample_size
    latents = torch.randn(len(PROMPTS), 4, size, size, generator=torch.Generator().manual_seed(0))
    configs = run_configs(pipe, latents)
    times: dict[str, list[float]] = {name: [] for name in configs}
    cleared: dict[str, int] = {}
    with torch.inference_mode():
        for round_index in range(repeats + 1):
            for name, config in configs.items():
                start = time.perf_counter()
                out = pipe(PROMPTS, latents=latents, num_inference_steps=STEPS, output_type="latent",
                           guard_config=config)  # fmt: skip
                if round_index:  # the first round warms up
                    times[name].append((time.perf_counter() - start) / len(PROMPTS))
                cleared[name] = 0 if out.report.cleared is None else int(out.report.cleared.sum())
    return {name: {"s": statistics.median(t), "min_s": min(t), "cleared": cleared[name]} for name, t in times.items()}


def layer_inputs(batch: int = 3, seed: int = 0):
    """SD 1.5's first cross-attention layer: 64x64 queries of width 320, 8 heads of 40, 77 tokens of 768."""
    torch.manual_seed(seed)
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40, processor=AttnProcessor2_0())
    holder = torch.nn.Module()
    holder.down_blocks = torch.nn.Module()
    holder.down_blocks.attn2 = attn
    hidden = torch.randn(batch, 4096, 320)
    text = torch.randn(batch, 77, 768)
    return holder, attn, hidden, text


def measure_layer(repeats: int) -> dict[str, float]:
    holder, attn, hidden, text = layer_inputs()
    config = GuardConfig(blocks=("down_blocks",))
    mask = torch.tensor([False, True, False])
    variants = {
        "sdpa": lambda: attn(hidden, encoder_hidden_states=text),
        "guard (spike rows a slice)": (slice(1, 2), True),
        "guard, no statistics": (slice(1, 2), False),
        "guard (spike rows a mask)": (mask, True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for round_index in range(repeats + 1):
            for name, variant in variants.items():
                if callable(variant):
                    start = time.perf_counter()
                    variant()
                    elapsed = time.perf_counter() - start
                else:
                    rows, stats = variant
                    with attenuate_cross_attention(holder, rows, config, collect_stats=stats):
                        start = time.perf_counter()
                        attn(hidden, encoder_hidden_states=text)
                        elapsed = time.perf_counter() - start
                if round_index:
                    times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def markdown(model: str, runs: dict, layer: dict) -> str:
    base = runs["cfg"]["s"]
    lines = [f"Runs: {model} model, {len(PROMPTS)} prompts x 1 image, {STEPS} DDIM steps, CPU "
             f"({torch.get_num_threads()} threads); seconds per image (median of the rounds)", "",
             "| run | cleared | s / image | x CFG | min s / image |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, values in runs.items():
        lines.append(f"| {name} | {values['cleared']} | {values['s']:.3f} | {values['s'] / base:.2f} |"
                     f" {values['min_s']:.3f} |")  # fmt: skip
    sdpa = layer["sdpa"]
    lines += ["", "Layer: SD 1.5 64x64 cross-attention, batch 3, spike rule on one row, fp32 (median ms)", "",
              "| processor | ms | x SDPA |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {1e3 * value:.1f} | {value / sdpa:.2f} |" for name, value in layer.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # the command line needs no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("name", RUNS)
    def test_whole_run(benchmark, name):
        pipe = build_pipeline("small")
        size = pipe.unet.config.sample_size
        latents = torch.randn(len(PROMPTS), 4, size, size, generator=torch.Generator().manual_seed(0))
        config = run_configs(pipe, latents)[name]
        benchmark.group = f"whole run, {STEPS} steps, {len(PROMPTS)} images"
        with torch.inference_mode():
            out = benchmark.pedantic(
                lambda: pipe(PROMPTS, latents=latents, num_inference_steps=STEPS, output_type="latent",
                             guard_config=config),
                rounds=3, warmup_rounds=1,
            )  # fmt: skip
        assert torch.isfinite(out.images).all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(markdown(args.model, measure_runs(args.model, args.repeats), measure_layer(args.repeats)))


if __name__ == "__main__":
    main()
