"""Tiny SD-shaped pipelines and an independent eager GUARD sampler for the sampler tests.

The eager sampler deliberately shares no code with ``guard``: it materialises the attention logits,
computes peaks, z-scores and the attenuation in plain PyTorch, and writes the guidance formula
out, the way the paper's released code does, so the library is checked against the spec.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple, Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from guard.testbed.tokenizer import build_tokenizer

TEXT_DIM = 32
PROMPTS = ("a red circle on a blue background", "a green square by the yellow triangle")


def tiny_unet(sd2: bool = False) -> UNet2DConditionModel:
    """Three down blocks with cross-attention (as SD's first three), a mid block, and cross-attention
    in two up blocks (layers GUARD leaves plain). SD 2.x layout: per-block head counts and linear
    projections."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        # diffusers reads attention_head_dim as the head COUNT when num_attention_heads is unset.
        attention_head_dim=(2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )


def tiny_text_encoder(tokenizer, sd2: bool = False) -> CLIPTextModel:
    torch.manual_seed(2)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
    )
    return CLIPTextModel(config).eval()


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_components(sd2: bool = False) -> dict:
    tokenizer = build_tokenizer()
    return {
        "unet": tiny_unet(sd2).eval(),
        "vae": tiny_vae().eval(),
        "text_encoder": tiny_text_encoder(tokenizer, sd2),
        "tokenizer": tokenizer,
        "scheduler": tiny_scheduler("v_prediction" if sd2 else "epsilon"),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def stock_pipeline(sd2: bool = False) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**tiny_components(sd2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 8, 8, generator=generator)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def tiny_ip_adapter(unet, image_embed_dim: int = 8) -> dict:
    """An IP-Adapter state dict for a UNet (random weights, laid out as diffusers loads them)."""
    generator = torch.Generator().manual_seed(3)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": 0.2 * torch.randn(4 * cross, image_embed_dim, generator=generator),
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            block = name.split(".")[0]
            if block == "mid_block":
                hidden = unet.config.block_out_channels[-1]
            elif block == "up_blocks":
                hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
            else:
                hidden = unet.config.block_out_channels[int(name.split(".")[1])]
            for kind in ("to_k_ip", "to_v_ip"):
                ip_adapter[f"{key_id}.{kind}.weight"] = 0.2 * torch.randn(hidden, cross, generator=generator)
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


# ----------------------------------------------------------------------------------------------
# Independent eager GUARD


class EagerSpikeAttention:
    """Cross-attention with materialised logits and GUARD's spike rule on the rows in ``rows``."""

    def __init__(self, rows: torch.Tensor, tau: float, alpha: float):
        self.rows = rows
        self.tau = tau
        self.alpha = alpha
        self.flags = None  # (B, Nk) int64: (call, head) pairs that flagged each token
        self.fixed = None  # (B, Nk) bool: once set, these tokens get alpha in every head, no spike rule

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is not None
        batch = hidden_states.shape[0]
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        head_dim = q.shape[-1] // heads
        q = q.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, Nq, D)
        k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # (B, H, Nq, Nk)
        if self.flags is None:
            self.flags = torch.zeros(batch, logits.shape[-1], dtype=torch.int64)
        for b in range(batch):
            if not self.rows[b]:
                continue
            if self.fixed is not None:
                logits[b, :, :, self.fixed[b]] = logits[b, :, :, self.fixed[b]] * self.alpha
                self.flags[b] += heads * self.fixed[b].long()
                continue
            for h in range(heads):
                peaks = logits[b, h].max(dim=0).values  # (Nk,)
                rest = peaks[1:]
                mean = rest.sum() / rest.numel()
                std = torch.sqrt(((rest - mean) ** 2).sum() / (rest.numel() - 1))
                z = (rest - mean) / (std + 1e-6)
                for j in range(1, peaks.numel()):
                    if z[j - 1] > self.tau:
                        logits[b, h, :, j] = logits[b, h, :, j] * self.alpha
                        self.flags[b, j] += 1
        if attention_mask is not None:  # an additive (B, 1, Nk) bias, as the UNet passes it
            logits = logits + attention_mask.view(batch, 1, 1, -1)
        probs = torch.softmax(logits, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out


class EagerRun(NamedTuple):
    latents: torch.Tensor
    flags: dict  # attenuated layer name -> (prompts, Nk) flag counts of the attenuated rows
    norms: list  # per step: ([|s v_pos|] per image, [|w_neg v_neg|] per image)


def _encode(tokenizer, text_encoder, texts):
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def eager_guard_latents(
    components: dict,
    prompts,
    latents: torch.Tensor,
    num_steps: int,
    *,
    method: str = "guard",
    s: float = 7.5,
    r: float = 2.0,
    tau: float = 0.1,
    alpha: float = 0.3,
    blocks=("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block"),
    orthogonalize: bool = False,
    scheduler=None,
    fixed_after: Optional[int] = None,
) -> torch.Tensor:
    """GUARD ("guard") or CA attenuation ("attenuation") sampled eagerly, one image per prompt.

    ``fixed_after``: after that many steps, each image's spike tokens are fixed (flagged at least half
    as often as its most-flagged token over those steps, summed over the layers) and from then on only
    they are attenuated, in every head (``GuardConfig.spike_tokens="first-step"``).
    """
    unet, tokenizer, text_encoder = components["unet"], components["tokenizer"], components["text_encoder"]
    if scheduler is None:
        scheduler = type(components["scheduler"]).from_config(components["scheduler"].config)
    n = len(prompts)
    cond = _encode(tokenizer, text_encoder, list(prompts))
    uncond = _encode(tokenizer, text_encoder, [""] * n)
    groups = 3 if method == "guard" else 2
    embeddings = torch.cat([uncond, cond, cond][:groups])
    rows = torch.tensor([False] * n + [True] * n + [False] * n)[: groups * n]

    originals = dict(unet.attn_processors)
    processors = {}
    for key, processor in originals.items():
        module_name = key[: -len(".processor")]
        chosen = module_name.endswith("attn2") and any(
            module_name == p or module_name.startswith(p + ".") for p in blocks
        )
        processors[key] = EagerSpikeAttention(rows, tau, alpha) if chosen else processor
    eager_layers = {k[: -len(".processor")]: p for k, p in processors.items() if isinstance(p, EagerSpikeAttention)}
    norms = []  # per step: (|s v_pos|, |w_neg v_neg|) per image
    unet.set_attn_processor(dict(processors))
    try:
        scheduler.set_timesteps(num_steps)
        x = latents * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            if fixed_after is not None and i == fixed_after:
                total = sum(processor.flags for processor in eager_layers.values())
                top = total.max(dim=1, keepdim=True).values
                fixed = (total > 0) & (2 * total >= top)
                for processor in eager_layers.values():
                    processor.fixed = fixed
            model_input = scheduler.scale_model_input(torch.cat([x] * groups), t)
            eps = unet(model_input, t, encoder_hidden_states=embeddings).sample
            if method == "guard":
                eps_u, eps_pos, eps_neg = eps[:n], eps[n : 2 * n], eps[2 * n :]
                v_pos = eps_pos - eps_u
                v_neg = eps_neg - eps_u
                if orthogonalize:
                    for b in range(n):
                        a, c = v_pos[b].flatten(), v_neg[b].flatten()
                        coef = torch.dot(a, c) / (torch.dot(c, c) + 1e-8)
                        norms_product = torch.sqrt(torch.dot(a, a) + 1e-8) * torch.sqrt(torch.dot(c, c) + 1e-8)
                        cos = torch.dot(a, c) / norms_product
                        if cos > 0.9:
                            v_pos[b] = v_pos[b] - coef.clamp(-2.0, 2.0) * v_neg[b]
                w_neg = r * math.cos(math.pi / 2 * i / num_steps)
                eps_hat = eps_u + s * v_pos - w_neg * v_neg
                norms.append(([float(s * v.norm()) for v in v_pos], [float(w_neg * v.norm()) for v in v_neg]))
            else:
                eps_u, eps_att = eps[:n], eps[n:]
                eps_hat = eps_u + s * (eps_att - eps_u)
                norms.append(([float(s * v.norm()) for v in eps_att - eps_u], [0.0] * n))
            x = scheduler.step(eps_hat, t, x).prev_sample
    finally:
        unet.set_attn_processor(originals)
    flags = {name: processor.flags[n : 2 * n] for name, processor in eager_layers.items()}
    return EagerRun(x, flags, norms)


# ----------------------------------------------------------------------------------------------
# Independent eager versions of the related methods the paper compares with


class EagerRenAttention:
    """Materialised cross-attention; on conditional rows BOS logit x c1 and tokens after EOS masked."""

    def __init__(self, eos_positions: dict, c1: float):
        self.eos_positions = eos_positions  # UNet row -> EOS position, conditional rows only
        self.c1 = c1

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, heads = hidden_states.shape[0], attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        head_dim = q.shape[-1] // heads
        q, k, v = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        for row, eos in self.eos_positions.items():
            logits[row, :, :, 0] = logits[row, :, :, 0] * self.c1
            logits[row, :, :, eos + 1 :] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def eager_related_latents(
    components: dict,
    prompts,
    latents: torch.Tensor,
    num_steps: int,
    method: str,
    *,
    s: float = 7.5,
    c1: float = 1.25,
    transition: float = 500.0,
    early_scale: float = 1.0,
    noise_scale: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Final latents of Ren et al. ("ren"), Jain et al. ("jain") or Somepalli et al. ("somepalli")."""
    unet, tokenizer, text_encoder = components["unet"], components["tokenizer"], components["text_encoder"]
    scheduler = type(components["scheduler"]).from_config(components["scheduler"].config)
    n = len(prompts)
    cond = _encode(tokenizer, text_encoder, list(prompts))
    uncond = _encode(tokenizer, text_encoder, [""] * n)
    if method == "somepalli":
        cond = cond + noise_scale * torch.randn(cond.shape, generator=torch.Generator().manual_seed(seed))
    embeddings = torch.cat([uncond, cond])
    originals = dict(unet.attn_processors)
    if method == "ren":
        ids = tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True).input_ids
        eos = {n + i: row.index(tokenizer.eos_token_id) for i, row in enumerate(ids)}
        unet.set_attn_processor({k: EagerRenAttention(eos, c1) if ".attn2." in k else p for k, p in originals.items()})
    try:
        scheduler.set_timesteps(num_steps)
        x = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([x] * 2), t)
            eps_u, eps_c = unet(model_input, t, encoder_hidden_states=embeddings).sample.chunk(2)
            scale = early_scale if method == "jain" and float(t) > transition else s
            x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    finally:
        unet.set_attn_processor(originals)
    return x


# ----------------------------------------------------------------------------------------------
# A tiny SDXL-shaped pipeline

SDXL_TEXT_DIM = 16  # each of the two text encoders; the UNet's cross-attention takes both, concatenated
SDXL_TIME_DIM = 4  # addition_time_embed_dim


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's layout in small: down_blocks.0 without cross-attention, down_blocks.1 and .2 and the
    mid block with several transformer layers each, cross-attention in two up blocks (GUARD leaves
    those plain), added text-time conditioning (pooled embedding + 6 size ids)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=2 * SDXL_TEXT_DIM,
        attention_head_dim=(2, 4, 4),  # head counts, as SDXL's config gives them
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_TEXT_DIM,
    )


def _sdxl_text_config(tokenizer, seed: int) -> CLIPTextConfig:
    torch.manual_seed(seed)
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=SDXL_TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=SDXL_TEXT_DIM,
    )


def tiny_sdxl_components() -> dict:
    """Components of a tiny SDXL base pipeline: two text encoders (the second with a projection, whose
    pooled output is the UNet's ``text_embeds``) sharing the offline tokenizer."""
    from transformers import CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(_sdxl_text_config(tokenizer, 2)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_sdxl_text_config(tokenizer, 3)).eval()
    return {
        "unet": tiny_sdxl_unet().eval(),
        "vae": tiny_vae().eval(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": tiny_scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def run_together(requests) -> list:
    """Each request (a function of a ``callback_on_step_end``) in its own thread, all of them inside
    their denoising loops at once (a barrier at the first step); their results in order. A request's
    exception is raised here, not lost in its thread."""
    barrier = threading.Barrier(len(requests))
    results, errors = [None] * len(requests), []

    def wait_for_the_others(pipeline, step, timestep, tensors):
        if step == 0:
            barrier.wait()
        return {}

    def serve(index):
        try:
            results[index] = requests[index](wait_for_the_others)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
