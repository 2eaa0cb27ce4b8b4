"""An identity "autoencoder" so a pixel-space UNet can sit inside StableDiffusionPipeline.

StableDiffusionPipeline always decodes latents through ``vae``; with ``block_out_channels=(1,)``
its ``vae_scale_factor`` is 1 and with ``scaling_factor=1.0`` the latents are the pixels in
[-1, 1], which the pipeline's postprocessing maps to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class IdentityDecoderOutput(BaseOutput):
    sample: torch.Tensor


class _PointDistribution:
    """Mimics ``DiagonalGaussianDistribution`` for a deterministic encoder."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def sample(self, generator=None) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


@dataclass
class IdentityEncoderOutput(BaseOutput):
    latent_dist: _PointDistribution


class PixelIdentityVAE(ModelMixin, ConfigMixin):
    """Encode and decode are the identity on images in [-1, 1]."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 3,
        block_out_channels: tuple[int, ...] = (1,),
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        if in_channels != latent_channels:
            raise ValueError(f"latent_channels must equal in_channels ({in_channels}) for an identity map")
        if len(block_out_channels) != 1 or scaling_factor != 1.0:
            raise ValueError("block_out_channels must have length 1 and scaling_factor must be 1.0 (pixel space)")
        # One buffer so that .dtype/.device and save/load behave like any other diffusers model.
        self.register_buffer("unit", torch.ones(()), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        out = _PointDistribution(x.to(self.unit.dtype))
        return IdentityEncoderOutput(latent_dist=out) if return_dict else (out,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        out = z.to(self.unit.dtype)
        return IdentityDecoderOutput(sample=out) if return_dict else (out,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(sample, return_dict=return_dict)
