"""GUARD on Stable Diffusion XL: ``StableDiffusionXLPipeline`` with GUARD's three-branch step.

The step and the loop are :mod:`guard.sampling`'s, shared with :class:`StableDiffusionGuardPipeline`;
what is SDXL's own is the conditioning each branch gets: the two text encoders' embeddings and the
UNet's added conditioning (the pooled embedding ``text_embeds`` and the size / crop ``time_ids``).
The unconditional branch gets the negative ones (``negative_prompt``, ``negative_original_size``,
...), the attenuated and the plain-prompt branches the positive ones. Prompt encoding, latents,
schedulers, ``denoising_end``, VAE decoding (upcast as the parent upcasts it), the watermark and
loading are the parent's. On SDXL the paper's blocks are ``down_blocks.1``, ``down_blocks.2`` and
``mid_block``, every transformer layer in them (see :func:`guard.attention.default_blocks` and
docs/sdxl.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from guard_kernels.validation import real_number

from .config import GuardConfig
from .pipeline import (
    _batch_size,
    check_call,
    check_latents,
    method_embeddings,
)
from .report import GuardReport
from .sampling import GuardSamplingMixin

#: SDXL's callback tensors (the parent's ``_callback_tensor_inputs``): where each lives in a branch's
#: conditioning; each is shown as ``cat([negative, positive])``, as the parent lays it out under CFG.
SDXL_CALLBACK_TENSORS = {
    "prompt_embeds": ("encoder_hidden_states",),
    "add_text_embeds": ("added_cond_kwargs", "text_embeds"),
    "add_time_ids": ("added_cond_kwargs", "time_ids"),
}
#: SDXL's size conditioning: original size, crop top-left corner, target size (6 time ids).
TIME_IDS = 6


@dataclass
class GuardXLPipelineOutput(StableDiffusionXLPipelineOutput):
    """The parent's output (``images``) with the run's :class:`~guard.report.GuardReport` as
    ``report``. With ``return_dict=False`` the pipeline returns the parent's tuple ``(images,)``,
    and the report is ``pipe.guard_report``."""

    report: Optional[GuardReport] = None


def _pair(name: str, value, default=None) -> Optional[tuple[int, int]]:
    """A (height, width)-like pair of integers as a tuple (the parent concatenates the three as tuples)."""
    if value is None:
        return default
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{name} must be a pair of integers such as (1024, 1024), got {value!r}")
    return tuple(value)


def _prompt_list(name: str, value, batch_size: int) -> None:
    """A list ``prompt_2`` / ``negative_prompt_2`` must have one entry per prompt."""
    if isinstance(value, (list, tuple)) and len(value) != batch_size:
        raise ValueError(f"{name} has {len(value)} entries, but there are {batch_size} prompts")


class StableDiffusionXLGuardPipeline(GuardSamplingMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL (base) sampled with GUARD.

    Load it like the parent:
    ``StableDiffusionXLGuardPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")`` or
    ``StableDiffusionXLGuardPipeline.from_pipe(existing_sdxl_pipeline)``; then pass ``guard_config=``
    (a :class:`GuardConfig`, a preset name, or None for the published GUARD run) to ``__call__``.
    The refiner (aesthetic-score time ids, no first text encoder) is refused: GUARD's branches are
    defined for the text-to-image base model.
    """

    def _check_model(self) -> None:
        """Refuse UNets GUARD cannot sample, before any work."""
        unet = self.unet.config
        if unet.addition_embed_type != "text_time":
            raise ValueError(
                f"this UNet's addition_embed_type is {unet.addition_embed_type!r}; an SDXL base UNet has 'text_time'"
            )
        if self.text_encoder is None or self.tokenizer is None or self.text_encoder_2 is None:
            raise ValueError(
                "StableDiffusionXLGuardPipeline needs both text encoders and tokenizers (an SDXL base model); the"
                " refiner layout (text_encoder_2 only, aesthetic-score time ids) is not supported"
            )
        expected = self.unet.add_embedding.linear_1.in_features
        passed = unet.addition_time_embed_dim * TIME_IDS + self.text_encoder_2.config.projection_dim
        if expected != passed:
            raise ValueError(
                f"this UNet's added embedding takes {expected} features, but {TIME_IDS} size time ids and the pooled"
                f" text embedding give {passed}; refiner-style (aesthetic-score) UNets are not supported"
            )

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], None] = None,
        prompt_2: Union[str, list[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[list[int]] = None,
        sigmas: Optional[list[float]] = None,
        denoising_end: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Union[str, list[str], None] = None,
        negative_prompt_2: Union[str, list[str], None] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image: Optional[PipelineImageInput] = None,
        ip_adapter_image_embeds: Optional[list[torch.Tensor]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        original_size: Optional[tuple[int, int]] = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: Optional[tuple[int, int]] = None,
        negative_original_size: Optional[tuple[int, int]] = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: Optional[tuple[int, int]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Union[Callable, PipelineCallback, MultiPipelineCallbacks, None] = None,
        callback_on_step_end_tensor_inputs: Optional[list[str]] = None,
        guard_config: Union[GuardConfig, str, None] = None,
        attention_backend: str = "auto",
        detection_steps: int = 1,
        **kwargs,
    ):
        """Generate images with GUARD, its attenuation-only variant, plain CFG or a related method.

        Arguments are those of ``StableDiffusionXLPipeline.__call__`` (the negative prompts,
        pooled embeddings and ``negative_original_size`` / ``negative_crops_coords_top_left`` /
        ``negative_target_size`` feed the unconditional branch), plus ``guard_config``,
        ``attention_backend`` and ``detection_steps`` as in
        :meth:`StableDiffusionGuardPipeline.__call__`.

        guidance_scale: if given, overrides ``guard_config.guidance_scale`` (GUARD's default is the
            paper's 7.5; the parent's default is 5.0). The unconditional branch always runs.
        denoising_end: as in the parent, the run stops at that fraction of the schedule; GUARD's
            repulsion schedule stays the full run's, so the steps run equal a full run's first steps.

        Returns :class:`GuardXLPipelineOutput` (a ``StableDiffusionXLPipelineOutput`` with
        ``report``), or the parent's tuple ``(images,)`` with ``return_dict=False`` (the report is
        then ``pipe.guard_report``). ``callback_on_step_end`` sees ``prompt_embeds``,
        ``add_text_embeds`` and ``add_time_ids`` as ``cat([negative rows, positive rows])``.
        """
        # 1. Check everything before any work.
        self._check_model()
        callback, callback_steps, config, guidance_rescale, callback_on_step_end_tensor_inputs = check_call(
            self.unet, kwargs, guard_config, guidance_scale, guidance_rescale, num_images_per_prompt, detection_steps,
            num_inference_steps, timesteps, sigmas, output_type, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        if denoising_end is not None:
            denoising_end = real_number("denoising_end", denoising_end, minimum=0.0, maximum=1.0)
            if denoising_end == 0.0:
                raise ValueError("denoising_end must be in (0, 1], got 0.0 (no step would run)")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = _pair("original_size", original_size, (height, width))
        target_size = _pair("target_size", target_size, (height, width))
        crops_coords_top_left = _pair("crops_coords_top_left", crops_coords_top_left)
        negative_crops_coords_top_left = _pair("negative_crops_coords_top_left", negative_crops_coords_top_left)
        negative_original_size = _pair("negative_original_size", negative_original_size)
        negative_target_size = _pair("negative_target_size", negative_target_size)
        if (negative_original_size is None) != (negative_target_size is None):
            raise ValueError(
                "pass negative_original_size and negative_target_size together (the parent ignores one given alone)"
            )
        batch_size = _batch_size(prompt, prompt_embeds)
        _prompt_list("prompt_2", prompt_2, batch_size)
        _prompt_list("negative_prompt_2", negative_prompt_2, batch_size)
        self.check_inputs(
            prompt, prompt_2, height, width, callback_steps, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        rows = batch_size * num_images_per_prompt
        check_latents(latents, rows, self.unet.config.in_channels, height, width, self.vae_scale_factor)
        self._guidance_scale = config.guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False
        device = self._execution_device

        # 2. Prepare: each branch's conditioning, timesteps, latents.
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        encoded = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True,  # GUARD's unconditional branch runs at any scale
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = encoded
        num_keys = prompt_embeds.shape[1]
        projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size, crops_coords_top_left, target_size, prompt_embeds.dtype, projection_dim
        )
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                prompt_embeds.dtype,
                projection_dim,
            )
        negative = {
            "encoder_hidden_states": negative_prompt_embeds.to(device),
            "added_cond_kwargs": {
                "text_embeds": negative_pooled_prompt_embeds.to(device),
                "time_ids": negative_add_time_ids.to(device).repeat(rows, 1),
            },
        }
        positive_added = {
            "text_embeds": pooled_prompt_embeds.to(device),
            "time_ids": add_time_ids.to(device).repeat(rows, 1),
        }
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, rows, True
            )  # each cat([negative, positive]), as the parent lays it out under CFG
            negative["added_cond_kwargs"]["image_embeds"] = [embeds.chunk(2)[0] for embeds in image_embeds]
            positive_added["image_embeds"] = [embeds.chunk(2)[1] for embeds in image_embeds]
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        schedule_steps = num_inference_steps  # GUARD's guidance schedule: the full run's, denoising_end or not
        if denoising_end is not None and denoising_end < 1.0:  # as the parent cuts the schedule
            train_steps = self.scheduler.config.num_train_timesteps
            cutoff = int(round(train_steps - denoising_end * train_steps))
            num_inference_steps = len(list(filter(lambda ts: ts >= cutoff, timesteps)))
            timesteps = timesteps[:num_inference_steps]
        latents = self.prepare_latents(
            rows, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        prompt_embeds, optimization = method_embeddings(
            self, config, latents, timesteps[0], negative_prompt_embeds, prompt_embeds, num_images_per_prompt,
            generator, (negative["added_cond_kwargs"], positive_added),
        )  # fmt: skip
        positive = {"encoder_hidden_states": prompt_embeds.to(device), "added_cond_kwargs": positive_added}
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        # 3. The denoising loop (the branches' conditioning packed by the denoiser for each call), the report.
        latents, report = self._guard_sample(
            config, prompt, batch_size, num_images_per_prompt, num_keys, negative, positive, latents, timesteps,
            num_inference_steps, device=device, attention_backend=attention_backend, detection_steps=detection_steps,
            guidance_rescale=guidance_rescale, extra_step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_tensor_inputs=callback_on_step_end_tensor_inputs, callback_tensors=(SDXL_CALLBACK_TENSORS, {}),
            callback=callback, callback_steps=callback_steps, schedule_steps=schedule_steps,
        )  # fmt: skip
        report.embedding_optimization = optimization

        # 4. Decoding.
        image = latents if output_type == "latent" else self._decode(latents, output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return GuardXLPipelineOutput(images=image, report=report)

    def _decode(self, latents: torch.Tensor, output_type: str):
        """The parent's decoding: the VAE in float32 when it is float16 and ``force_upcast`` is set
        (SDXL's VAE overflows in float16), the latents' mean / std if the VAE has them, the
        watermark if one is installed."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        latents = latents.to(get_module_execution_device(vae), vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)
