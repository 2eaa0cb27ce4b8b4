"""One denoising step of GUARD vs plain CFG vs an eager GUARD that materialises attention.

A step is the UNet call on all branch rows, the guidance combination and a DDIM update:

- ``cfg``: classifier-free guidance, 2 row groups, the UNet's stock processors (SDPA);
- ``guard``: GUARD through ``guard.attention`` (the fused kernel on every ``attn2`` layer, the
  spike rule on the attenuated rows of the chosen blocks), 3 row groups;
- ``guard_eager``: GUARD the way the paper's code runs it: every ``attn2`` layer materialises its
  (rows, heads, queries, tokens) logits and probabilities in eager PyTorch, 3 row groups.

GUARD runs 1.5x the rows of CFG, so ~1.5x CFG's time is the floor. Models (random weights):
``tiny`` (the test suite's shape, CPU), ``small`` (SD-shaped, reduced widths, CPU), ``sd15``
(SD 1.5's UNet, fp16, 4 images of one prompt at 512x512; CUDA only), ``sdxl-small`` (SDXL-shaped,
reduced widths, CPU: SDXL's block layout, no cross-attention in ``down_blocks.0``, more
transformer layers deeper, head dim 64, text_time added conditioning) and ``sdxl`` (SDXL base's
UNet config, fp16, 4 images of one prompt at 1024x1024, i.e. 128x128 latents; CUDA only). The
SDXL steps pass each row its pooled text embedding and time ids (``added_cond_kwargs``).

Run: ``python -m pytest bench/bench_sampler.py`` (pytest-benchmark), or
``python bench/bench_sampler.py --model small`` for a markdown table with ratios and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from guard.attention import attenuate_cross_attention, cross_attention_layers, select_attenuated_layers
from guard.config import GuardConfig
from guard.guidance import cfg_guidance, combine_predictions
from guard.sampling import stack_conditioning

VARIANTS = ("cfg", "guard", "guard_eager")

_SD_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}

_SDXL_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "use_linear_projection": True,
}  # fmt: skip

#: stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the fields that shape the model).
SDXL_UNET = {
    "sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
    **_SDXL_BLOCKS,
}  # fmt: skip

MODELS = {
    "tiny": {
        "unet": {
            "sample_size": 8, "block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3,
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32, "attention_head_dim": 2,
        },
        "images": 2, "dtype": torch.float32, "device": "cpu",
    },
    "small": {
        "unet": {
            "sample_size": 32, "block_out_channels": (32, 64, 128, 128), "layers_per_block": 2,
            "norm_num_groups": 16, "cross_attention_dim": 128, "attention_head_dim": 4, **_SD_BLOCKS,
        },
        "images": 2, "dtype": torch.float32, "device": "cpu",
    },
    "sd15": {
        "unet": {
            "sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
            "cross_attention_dim": 768, "attention_head_dim": 8, **_SD_BLOCKS,
        },
        "images": 4, "dtype": torch.float16, "device": "cuda",
    },
    "sdxl-small": {
        "unet": {
            # diffusers reads attention_head_dim as head counts here: 128 / 2 = 256 / 4 = 64 per head.
            "sample_size": 32, "block_out_channels": (64, 128, 256), "layers_per_block": 2,
            "transformer_layers_per_block": (1, 2, 4), "attention_head_dim": (1, 2, 4),
            "cross_attention_dim": 512, "addition_time_embed_dim": 32,
            "projection_class_embeddings_input_dim": 256 + 6 * 32, **_SDXL_BLOCKS,
        },
        "images": 2, "dtype": torch.float32, "device": "cpu",
    },
    "sdxl": {"unet": SDXL_UNET, "images": 4, "dtype": torch.float16, "device": "cuda"},
}  # fmt: skip

#: The models whose UNet takes SDXL's added conditioning (a pooled text embedding and time ids per row).
SDXL_MODELS = tuple(name for name, spec in MODELS.items() if spec["unet"].get("addition_embed_type") == "text_time")


@dataclass
class StepSetup:
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    latents: torch.Tensor  # (N, 4, h, w)
    uncond: torch.Tensor  # (N, 77, D)
    cond: torch.Tensor  # (N, 77, D)
    timestep: torch.Tensor
    config: GuardConfig
    #: SDXL's added conditioning per branch, one row per image: {"text_embeds": (N, P), "time_ids": (N, 6)}
    added_uncond: Optional[dict] = None
    added_cond: Optional[dict] = None

    @property
    def device(self) -> torch.device:
        return self.latents.device

    def branches(self) -> tuple[dict, dict]:
        """The UNet's conditioning of the unconditional and of the prompt's branches, one row per
        image (SDXL's added conditioning when the model has it), as ``GuardDenoiser`` takes them."""
        negative, positive = {"encoder_hidden_states": self.uncond}, {"encoder_hidden_states": self.cond}
        if self.added_cond is not None:
            negative["added_cond_kwargs"], positive["added_cond_kwargs"] = self.added_uncond, self.added_cond
        return negative, positive

    def unet_kwargs(self, groups: int) -> dict:
        """The UNet's conditioning for ``groups`` row groups (uncond | cond [| cond])."""
        negative, positive = self.branches()
        return stack_conditioning([negative] + [positive] * (groups - 1))


def added_conditioning(unet_config: dict, rows: int, size: int, generator, device, dtype):
    """SDXL's added conditioning of random uncond and cond pooled text embeddings, and the time ids
    a pipeline passes at ``size`` latents (original size, crop (0, 0), target size, in pixels)."""
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    pixels = 8 * size
    time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], device=device, dtype=dtype).expand(rows, 6)
    return [
        {"text_embeds": torch.randn(rows, pooled, generator=generator, device=device, dtype=dtype),
         "time_ids": time_ids.contiguous()}
        for _ in range(2)
    ]  # fmt: skip


def build_unet(unet_config: dict, device, dtype, seed: int = 0) -> UNet2DConditionModel:
    """A UNet of ``unet_config`` with random weights, built on ``device``, in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).eval()
    return unet.to(dtype) if dtype != torch.float32 else unet


def build_setup(model: str, seed: int = 0) -> StepSetup:
    spec = MODELS[model]
    return build_setup_for(spec["unet"], spec["images"], torch.device(spec["device"]), spec["dtype"], seed)


def build_setup_for(unet_config: dict, images: int, device, dtype, seed: int = 0, unet=None) -> StepSetup:
    """One step's inputs on a UNet of ``unet_config`` (random weights unless ``unet`` is given)."""
    device = torch.device(device)
    unet = build_unet(unet_config, device, dtype, seed) if unet is None else unet
    size = unet_config["sample_size"]
    rows, width = images, unet_config["cross_attention_dim"]
    generator = torch.Generator(device).manual_seed(seed)
    latents = torch.randn(rows, 4, size, size, generator=generator, device=device, dtype=dtype)
    uncond = torch.randn(rows, 77, width, generator=generator, device=device, dtype=dtype)
    cond = torch.randn(rows, 77, width, generator=generator, device=device, dtype=dtype)
    added = [None, None]
    if unet_config.get("addition_embed_type") == "text_time":
        added = added_conditioning(unet_config, rows, size, generator, device, dtype)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    scheduler.set_timesteps(50, device=device)
    # The published rule resolves the attenuated blocks on each UNet (blocks=None).
    return StepSetup(unet, scheduler, latents, uncond, cond, scheduler.timesteps[0], GuardConfig(), *added)


class EagerGuardAttention:
    """Cross-attention with materialised logits/probabilities and GUARD's spike rule, vectorised."""

    def __init__(self, rows, config: GuardConfig, attenuate: bool):
        self.rows, self.config, self.attenuate = rows, config, attenuate

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, heads = hidden_states.shape[0], attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = q.shape[-1] // heads
        q, k, v = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))
        logits = (q @ k.transpose(-1, -2)) * attn.scale  # (B, H, Nq, Nk), materialised
        if self.attenuate:
            peaks = logits.float().amax(dim=2)
            body = peaks[..., 1:]
            z = (body - body.mean(-1, keepdim=True)) / (body.std(-1, keepdim=True) + 1e-6)
            spikes = torch.nn.functional.pad(z > self.config.spike_threshold, (1, 0)) & self.rows.view(-1, 1, 1)
            logits = torch.where(spikes.unsqueeze(2), logits * self.config.spike_scale, logits)
        probs = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def eager_guard(unet, rows, config: GuardConfig):
    layers = cross_attention_layers(unet)
    chosen = set(select_attenuated_layers(layers, config.blocks))
    originals = {name: module.processor for name, module in layers.items()}
    try:
        for name, module in layers.items():
            module.set_processor(EagerGuardAttention(rows, config, name in chosen))
        yield
    finally:
        for name, module in layers.items():
            module.set_processor(originals[name])


def make_step(setup: StepSetup, variant: str, stack: contextlib.ExitStack) -> Callable[[], torch.Tensor]:
    """The step callable; processors are installed on ``stack`` (outside the timed region)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    unet, scheduler, t = setup.unet, setup.scheduler, setup.timestep
    n = setup.latents.shape[0]
    config = setup.config
    sync = torch.cuda.synchronize if setup.device.type == "cuda" else (lambda: None)
    if variant == "cfg":
        conditioning = setup.unet_kwargs(2)

        def step():
            eps = unet(torch.cat([setup.latents] * 2), t, **conditioning).sample
            out = scheduler.step(cfg_guidance(*eps.chunk(2), config.guidance_scale), t, setup.latents).prev_sample
            sync()
            return out

        return step
    conditioning = setup.unet_kwargs(3)
    if variant == "guard":  # the attenuated branch as the pipeline marks it: a slice of the batch
        stack.enter_context(attenuate_cross_attention(unet, slice(n, 2 * n), config))
    else:
        rows = torch.zeros(3 * n, dtype=torch.bool, device=setup.device)
        rows[n : 2 * n] = True
        stack.enter_context(eager_guard(unet, rows, config))

    def step():
        eps = unet(torch.cat([setup.latents] * 3), t, **conditioning).sample
        out = scheduler.step(combine_predictions(eps, 0, 50, config), t, setup.latents).prev_sample
        sync()
        return out

    return step


def peak_memory_bytes(step: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak bytes allocated during one step beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure(model: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median step time and peak memory per variant; rounds interleave the variants so that load
    from other processes on a shared machine hits them alike."""
    setup = build_setup(model)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    peaks: dict[str, int] = {}
    with torch.inference_mode():
        for round_index in range(repeats + 1):
            for variant in VARIANTS:
                with contextlib.ExitStack() as stack:
                    step = make_step(setup, variant, stack)
                    if round_index == 0:  # warm-up (Triton compilation, allocator), then memory
                        step()
                        peaks[variant] = peak_memory_bytes(step, setup.device)
                        continue
                    start = time.perf_counter()
                    step()
                    times[variant].append(time.perf_counter() - start)
    return {
        variant: {
            "ms": 1e3 * statistics.median(times[variant]),
            "min_ms": 1e3 * min(times[variant]),
            "peak": peaks[variant],
        }
        for variant in VARIANTS
    }


def markdown_table(model: str, results: dict[str, dict[str, float]], device_name: str) -> str:
    base = results["cfg"]
    lines = [
        f"{model} on {device_name} (median and min of the timed steps; peak = bytes allocated during one step):",
        "",
        "| variant | median ms | x CFG | min ms | x CFG | peak MiB | x CFG |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, values in results.items():
        ratio_mem = values["peak"] / base["peak"] if base["peak"] else math.nan
        lines.append(
            f"| {variant} | {values['ms']:.2f} | {values['ms'] / base['ms']:.2f} | {values['min_ms']:.2f} |"
            f" {values['min_ms'] / base['min_ms']:.2f} | {values['peak'] / 2**20:.1f} | {ratio_mem:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entry points

_SETUPS: dict[str, StepSetup] = {}
_MEDIANS: dict[tuple[str, str], float] = {}


def _setup_for(model: str) -> StepSetup:
    spec = MODELS[model]
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"the {model} benchmark needs a CUDA GPU (a full-sized UNet in fp16); none is available")
    if model not in _SETUPS:
        _SETUPS[model] = build_setup(model)
    return _SETUPS[model]


@pytest.mark.parametrize("model", ["tiny", "small", "sd15", "sdxl-small", "sdxl"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_denoising_step(benchmark, model, variant):
    setup = _setup_for(model)
    benchmark.group = f"denoising step, {model}"
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        step = make_step(setup, variant, stack)
        step()
        benchmark.extra_info["peak_bytes"] = peak_memory_bytes(step, setup.device)
        result = benchmark.pedantic(step, rounds=5 if model != "tiny" else 20, warmup_rounds=1)
    assert torch.isfinite(result).all()
    if benchmark.stats is not None:
        _MEDIANS[(model, variant)] = benchmark.stats.stats.median


@pytest.mark.parametrize("model", ["tiny", "small", "sd15", "sdxl-small", "sdxl"])
def test_ratio_to_cfg(model):
    """Prints GUARD's and eager GUARD's step time as a multiple of CFG's (the floor is 1.5)."""
    if not all((model, v) in _MEDIANS for v in VARIANTS):
        pytest.skip(f"the {model} step benchmarks did not run (or ran with --benchmark-disable)")
    base = _MEDIANS[(model, "cfg")]
    print(f"\n{model}: " + ", ".join(f"{v} {_MEDIANS[(model, v)] / base:.2f}x CFG" for v in VARIANTS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if MODELS[args.model]["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--model {args.model} needs a CUDA GPU")
    device_name = torch.cuda.get_device_name() if MODELS[args.model]["device"] == "cuda" else "CPU"
    if device_name == "CPU":
        device_name += f" ({torch.get_num_threads()} threads)"
    print(markdown_table(args.model, measure(args.model, args.repeats), device_name))


if __name__ == "__main__":
    main()
