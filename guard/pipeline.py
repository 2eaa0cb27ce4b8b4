"""GUARD as a normal diffusers pipeline: ``StableDiffusionPipeline`` with a three-branch step.

Per denoising step the UNet runs once on ``branches x prompts x images`` rows (GUARD_SPEC
section 1): unconditional, attenuated prompt (the spike rule of section 2 in the chosen blocks,
through :func:`guard.attention.attenuate_cross_attention`) and, for "guard", the plain prompt;
:func:`guard.guidance.combine_predictions` turns them into one prediction for the scheduler. The
rest (prompt encoding, latents, schedulers, VAE decoding, safety checker, callbacks, from_pretrained
/ from_pipe) is the parent pipeline's, so any diffusers scheduler and SD 1.x / 2.x weights work.
The same loop runs the related mitigations GUARD is compared with ("ren", "jain", "somepalli";
see :class:`guard.config.GuardConfig`), so that comparisons share one sampler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .attention import attenuate_cross_attention
from .config import GuardConfig
from .guidance import combine_predictions, memorization_gate, repulsion_weight
from .report import GuardReport, position_labels, token_labels

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GuardPipelineOutput(BaseOutput):
    """images: PIL images, a numpy array or a tensor (latents for ``output_type="latent"``);
    nsfw_content_detected: the safety checker's verdicts (None without one);
    report: the :class:`~guard.report.GuardReport` of the run."""

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]
    nsfw_content_detected: Optional[list[bool]]
    report: GuardReport


def _resolve_config(guard_config, guidance_scale) -> GuardConfig:
    if guard_config is None:
        config = GuardConfig()
    elif isinstance(guard_config, str):
        config = GuardConfig.preset(guard_config)
    elif isinstance(guard_config, GuardConfig):
        config = guard_config
    else:
        raise TypeError(f"guard_config must be a GuardConfig, a preset name or None, got {type(guard_config).__name__}")
    if guidance_scale is not None:
        config = config.replace(guidance_scale=guidance_scale)
    return config


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class StableDiffusionGuardPipeline(StableDiffusionPipeline):
    """Stable Diffusion (1.x / 2.x, epsilon or v-prediction) sampled with GUARD.

    Load it like the parent: ``StableDiffusionGuardPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")``
    or ``StableDiffusionGuardPipeline.from_pipe(existing_pipeline)``; then pass ``guard_config=``
    (a :class:`GuardConfig`, a preset name such as ``"attenuation"``, or None for the published
    GUARD run) to ``__call__``.
    """

    def _prompt_token_ids(self, prompt) -> list[list[int]]:
        """Token ids exactly as ``encode_prompt`` tokenizes ``prompt`` (str or list)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(self, TextualInversionLoaderMixin):
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
        ).input_ids

    def _prompt_token_labels(self, prompt, batch_size: int, num_keys: int) -> tuple[list, list[list[str]]]:
        if prompt is None:
            return [None] * batch_size, [position_labels(num_keys)] * batch_size
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return prompts, [token_labels(self.tokenizer, row, num_keys) for row in self._prompt_token_ids(prompt)]

    def _ren_token_modulation(self, prompt, config, rows, images_per_prompt, num_keys, device, dtype):
        """Ren et al.'s logit modulation over the UNet batch: on the conditional rows, BOS logit x
        ``bos_scale`` and every position after the prompt's EOS masked; unconditional rows untouched."""
        if prompt is None:
            raise ValueError(
                "method 'ren' needs the prompt text to find each prompt's EOS; prompt_embeds alone are not enough"
            )
        eos_id = self.tokenizer.eos_token_id
        scale = torch.ones(2 * rows, num_keys, dtype=torch.float32)
        bias = torch.zeros(2 * rows, num_keys, dtype=torch.float32)
        for p, ids in enumerate(self._prompt_token_ids(prompt)):
            ids = list(ids)[:num_keys]
            eos = ids.index(eos_id) if eos_id in ids else num_keys - 1
            cond_rows = slice(rows + p * images_per_prompt, rows + (p + 1) * images_per_prompt)
            scale[cond_rows, 0] = config.bos_scale
            bias[cond_rows, eos + 1 :] = float("-inf")
        return scale.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[list[int]] = None,
        sigmas: Optional[list[float]] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Union[str, list[str], None] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Union[Callable, PipelineCallback, MultiPipelineCallbacks, None] = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        guard_config: Union[GuardConfig, str, None] = None,
        attention_backend: str = "auto",
    ):
        """Generate images with GUARD, its attenuation-only variant, plain CFG or a related method.

        Arguments are those of ``StableDiffusionPipeline.__call__`` (``negative_prompt`` feeds the
        unconditional branch), plus:

        guard_config: :class:`GuardConfig`, a preset name (see ``guard.config.PRESETS``) or None
            for the published GUARD run.
        guidance_scale: if given, overrides ``guard_config.guidance_scale``. Unlike the parent,
            the unconditional branch always runs (GUARD needs it at any scale).
        attention_backend: kernel backend for the attenuated cross-attention ("auto", "triton",
            "torch").

        Returns :class:`GuardPipelineOutput` (images, nsfw_content_detected, report), or the tuple
        ``(images, nsfw_content_detected, report)`` with ``return_dict=False``. The guidance
        schedule's progress is ``step / len(scheduler timesteps)``.
        """
        config = _resolve_config(guard_config, guidance_scale)
        _positive_int("num_images_per_prompt", num_images_per_prompt)
        if timesteps is None and sigmas is None:
            _positive_int("num_inference_steps", num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError(
                "this UNet is guidance-distilled (time_cond_proj_dim is set); GUARD needs a model sampled with"
                " classifier-free guidance"
            )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        sample_size = self.unet.config.sample_size
        size_h, size_w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size[:2]
        height = height or size_h * self.vae_scale_factor
        width = width or size_w * self.vae_scale_factor
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
            None, None, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = config.guidance_scale
        self._guidance_rescale = 0.0
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            True,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        branches = config.branches
        rows = batch_size * num_images_per_prompt
        num_keys = prompt_embeds.shape[1]

        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = self.prepare_latents(
            rows, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        if config.method == "somepalli":  # drawn after the latents, so that a seed gives the same latents
            noise = randn_tensor(prompt_embeds.shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
            prompt_embeds = prompt_embeds + config.embedding_noise_scale * noise
        # Row groups: unconditional, attenuated prompt, (GUARD only) plain prompt; same latents.
        prompt_embeds = torch.cat([negative_prompt_embeds] + [prompt_embeds] * (branches - 1))
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        # GUARD_SPEC's schedule runs over inference steps; second-order schedulers (Heun, KDPM2) make
        # `order` UNet calls per step, and each call of a step uses that step's weight.
        order = self.scheduler.order
        total_steps = num_inference_steps

        if config.attenuates:
            spike_rows = torch.zeros(branches * rows, dtype=torch.bool, device=device)
            spike_rows[rows : 2 * rows] = True
            session_scope = attenuate_cross_attention(self.unet, spike_rows, config, backend=attention_backend)
        elif config.method == "ren":
            token_scale, token_bias = self._ren_token_modulation(
                prompt, config, rows, num_images_per_prompt, num_keys, device, torch.float32
            )
            session_scope = attenuate_cross_attention(
                self.unet, None, config, backend=attention_backend, token_scale=token_scale, token_bias=token_bias
            )
        else:
            session_scope = contextlib.nullcontext(None)

        norm_history: list[torch.Tensor] = []
        plain_images = None  # GuardConfig.gate_cos_threshold's per-image decision, once made
        with session_scope as session, self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * branches)
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0]
                if config.gate_cos_threshold is not None and plain_images is None:  # decided on the first call
                    plain_images = memorization_gate(*noise_pred.chunk(3), config)
                noise_pred, norms = combine_predictions(
                    noise_pred,
                    min(i // order, total_steps - 1),
                    total_steps,
                    config,
                    timestep=t,
                    return_norms=True,
                    plain_images=plain_images,
                )
                norm_history.append(torch.stack(tuple(norms)))  # (3, rows), stays on the device
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        report = self._build_report(
            config, prompt, batch_size, num_images_per_prompt, num_keys, session, norm_history, total_steps, order,
            plain_images,
        )  # fmt: skip

        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not x for x in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()

        if not return_dict:
            return image, has_nsfw_concept, report
        return GuardPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept, report=report)

    def _build_report(
        self,
        config,
        prompt,
        batch_size,
        images_per_prompt,
        num_keys,
        session,
        norm_history,
        total_steps,
        order,
        plain_images,
    ) -> GuardReport:
        """Move the loop's device-side records to the host (the run's only transfer of them)."""
        prompts, labels = self._prompt_token_labels(prompt, batch_size, num_keys)
        rows = batch_size * images_per_prompt
        steps_run = len(norm_history)
        if steps_run:
            norms = torch.stack(norm_history).float().cpu().view(steps_run, 3, batch_size, images_per_prompt)
        else:
            norms = torch.zeros(0, 3, batch_size, images_per_prompt)
        layer_names: tuple[str, ...] = ()
        layer_heads: tuple[int, ...] = ()
        flag_counts = torch.zeros(batch_size, 0, num_keys, dtype=torch.int64)
        if session is not None:
            counts = session.spike_counts()
            layer_names = tuple(name for name in session.attenuated_layers if name in counts)
            layer_heads = tuple(session.heads[name] for name in layer_names)
            if layer_names:
                stacked = torch.stack([counts[name][rows : 2 * rows] for name in layer_names], dim=0)
                stacked = stacked.cpu().to(torch.int64).view(len(layer_names), batch_size, images_per_prompt, -1)
                flag_counts = stacked.sum(dim=2).permute(1, 0, 2).contiguous()
        return GuardReport(
            config=config,
            prompts=prompts,
            token_labels=labels,
            layer_names=layer_names,
            layer_heads=layer_heads,
            flag_counts=flag_counts,
            images_per_prompt=images_per_prompt,
            num_steps=steps_run,
            repulsion_weights=[
                repulsion_weight(min(i // order, total_steps - 1), total_steps, config)
                if config.method == "guard"
                else 0.0
                for i in range(steps_run)
            ],
            attraction_norms=norms[:, 0],
            repulsion_norms=norms[:, 1],
            cosines=norms[:, 2],
            guided_plain=None if plain_images is None else plain_images.cpu().view(batch_size, images_per_prompt),
        )
