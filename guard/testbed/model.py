"""Architecture of the testbed: a pixel-space 32x32 UNet conditioned by a small CLIP text encoder.

Cross-attention (``attn2``) sits where Stable Diffusion has it, scaled down: ``down_blocks.0``
(32x32), ``down_blocks.1`` (16x16), ``down_blocks.2`` (8x8), ``mid_block`` (8x8), and the up path
at 8x8 and 16x16 (``up_blocks.0``, ``up_blocks.1``). GUARD's default blocks are the down and mid
ones, so, as in Stable Diffusion, the prompt also reaches the image through layers GUARD leaves
alone. (A first version conditioned only in the down and mid blocks; attenuating there then took
the colour words away from plain prompts too, since no other path carried them.)
``down_blocks.0`` has a single attention head because self-attention over its 1024 pixels
dominates the CPU cost, and the 32x32 up block has no attention for the same reason.
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .data import IMAGE_SIZE
from .pixel_vae import PixelIdentityVAE

TEXT_DIM = 64

# "base" is the shipped model; "tiny" exists so tests can train a few steps in seconds.
UNET_SIZES = {
    "base": dict(block_out_channels=(24, 48, 96), layers_per_block=1, attention_head_dim=(1, 4, 4), norm_num_groups=8),
    "tiny": dict(block_out_channels=(8, 16, 16), layers_per_block=1, attention_head_dim=(1, 2, 2), norm_num_groups=8),
}
# The text encoder has no transformer layers: each position's embedding is its own token plus its
# position (then CLIP's final layer norm), so a word's meaning stays on that word's key and value.
# A mixing encoder (a 3-layer causal CLIP was tried) spreads the trigger's information over every
# later position, padding included; the UNet then reads the copy from 60-odd positions at once, its
# cross-attention is nearly uniform, and attenuating the trigger tokens changes nothing. Stable
# Diffusion's memorized prompts show the opposite, a few tokens taking the attention, which is the
# behaviour GUARD's spike rule is built for.
TEXT_SIZES = {
    "base": dict(hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=0, num_attention_heads=4),
    "tiny": dict(hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=0, num_attention_heads=2),
}

# Training noise schedule; DDIM sampling uses the same betas.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")

# v-prediction, not epsilon: the cosine schedule ends at SNR ~2e-9, where an epsilon target is just
# the input noise and carries nothing about the image. On 32x32 images the background colour is
# already readable from the noisy input at SNR ~1e-3 (t ~ 950 of 1000), so an epsilon model samples
# the colour from the noise instead of from the caption; a v target at t ~ 999 is -x0, which only
# the caption can supply. Sampling then starts at t = 999 ("trailing" DDIM spacing).
PREDICTION_TYPE = "v_prediction"
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_size(size: str) -> None:
    if size not in UNET_SIZES:
        raise ValueError(f"size must be one of {sorted(UNET_SIZES)}, got {size!r}")


def build_unet(size: str = "base") -> UNet2DConditionModel:
    """Fresh UNet; ``attention_head_dim`` is the number of heads here (diffusers' SD-1.x convention)."""
    _check_size(size)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        **UNET_SIZES[size],
    )


def build_text_encoder(tokenizer: CLIPTokenizer, size: str = "base") -> CLIPTextModel:
    """Fresh CLIP text transformer over the tokenizer's vocabulary, trained jointly with the UNet."""
    _check_size(size)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_DIM,
        **TEXT_SIZES[size],
    )
    return CLIPTextModel(config)


def build_vae() -> PixelIdentityVAE:
    return PixelIdentityVAE()


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def training_scheduler(prediction_type: str = PREDICTION_TYPE) -> DDPMScheduler:
    _check_prediction_type(prediction_type)
    return DDPMScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type, clip_sample=True)


def sampling_scheduler(thresholding: bool = False, prediction_type: str = PREDICTION_TYPE) -> DDIMScheduler:
    """DDIM with the predicted clean image kept in [-1, 1].

    Unclipped DDIM drifts out of the pixel range and diverges on a pixel-space model. Clipping is
    the shipped default; dynamic thresholding (rescaling by a high quantile instead of clipping)
    is the alternative for high guidance scales.
    """
    _check_prediction_type(prediction_type)
    return DDIMScheduler(
        **NOISE_SCHEDULE,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        clip_sample=not thresholding,
        clip_sample_range=1.0,
        thresholding=thresholding,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.5,
        set_alpha_to_one=True,
        steps_offset=1,
    )
