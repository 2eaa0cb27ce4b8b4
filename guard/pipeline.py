"""GUARD as a normal diffusers pipeline: ``StableDiffusionPipeline`` with a three-branch step.

Per denoising step the UNet runs once on ``branches x prompts x images`` rows (arXiv 2603.00133,
sec. 3): unconditional, attenuated prompt (the spike rule in the chosen blocks) and, for "guard",
the plain prompt; :mod:`guard.sampling` holds that step and the loop around it. The rest (prompt
encoding, latents, schedulers, VAE decoding, safety checker, callbacks, from_pretrained /
from_pipe) is the parent pipeline's, so any diffusers scheduler and SD 1.x / 2.x weights work. The
same loop runs the related mitigations GUARD is compared with ("ren", "jain", "somepalli"; see
:class:`guard.config.GuardConfig`), so that comparisons share one sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable, Optional, Union

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import randn_tensor

from guard_kernels.validation import real_number

from .config import GuardConfig
from .report import GuardReport
from .sampling import GuardSamplingMixin
from .wen import optimize_prompt_embeddings

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GuardPipelineOutput(StableDiffusionPipelineOutput):
    """The parent's output (``images``, ``nsfw_content_detected``) with the run's
    :class:`~guard.report.GuardReport` as ``report``. With ``return_dict=False`` the pipeline
    returns the parent's tuple, and the report is ``pipe.guard_report``."""

    report: Optional[GuardReport] = None


#: ``model_index.json`` ``_class_name`` values GUARD samples: (module under guard, GUARD pipeline class).
GUARD_PIPELINES = {
    "StableDiffusionPipeline": ("pipeline", "StableDiffusionGuardPipeline"),
    "StableDiffusionGuardPipeline": ("pipeline", "StableDiffusionGuardPipeline"),
    "StableDiffusionXLPipeline": ("pipeline_sdxl", "StableDiffusionXLGuardPipeline"),
    "StableDiffusionXLGuardPipeline": ("pipeline_sdxl", "StableDiffusionXLGuardPipeline"),
}
#: What GUARD_PIPELINES covers, for error messages.
SUPPORTED_PIPELINES = "StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusionXLPipeline (SDXL) text-to-image models"


def guard_pipeline_class(class_name: Optional[str]):
    """The GUARD pipeline class for a diffusers pipeline class name (a ``model_index.json``'s
    ``_class_name``), or None for a model family GUARD does not sample (SDXL's module is imported
    only when asked for)."""
    if class_name not in GUARD_PIPELINES:
        return None
    module, name = GUARD_PIPELINES[class_name]
    return getattr(import_module(f".{module}", __package__), name)


def resolve_config(guard_config, guidance_scale=None) -> GuardConfig:
    """A GuardConfig from a GuardConfig, a preset name or None (the published run), with an optional
    ``guidance_scale`` override."""
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


def _deprecated_callback(kwargs: dict):
    """The parent's deprecated ``callback`` / ``callback_steps``, with its warning; anything else
    left in ``kwargs`` is an unknown argument."""
    callback = kwargs.pop("callback", None)
    callback_steps = kwargs.pop("callback_steps", None)
    if kwargs:
        raise TypeError(f"unexpected keyword argument(s): {sorted(kwargs)}")
    for name, value in (("callback", callback), ("callback_steps", callback_steps)):
        if value is not None:
            message = f"Passing `{name}` as an input argument to `__call__` is deprecated, use `callback_on_step_end`"
            deprecate(name, "1.0.0", message)
    return callback, callback_steps


def check_call(unet, kwargs: dict, guard_config, guidance_scale, guidance_rescale, num_images_per_prompt,
               detection_steps, num_inference_steps, timesteps, sigmas, output_type, callback_on_step_end,
               callback_tensor_inputs):  # fmt: skip
    """The call arguments every GUARD pipeline checks before any work.

    Returns the deprecated ``callback`` and ``callback_steps``, the run's :class:`GuardConfig`,
    ``guidance_rescale`` as a float and the callback's tensor names; refuses unknown keyword
    arguments, bad counts and output types, and guidance-distilled UNets (GUARD needs CFG's
    unconditional prediction).
    """
    callback, callback_steps = _deprecated_callback(kwargs)
    config = resolve_config(guard_config, guidance_scale)
    guidance_rescale = real_number("guidance_rescale", guidance_rescale, minimum=0.0, maximum=1.0)
    _positive_int("num_images_per_prompt", num_images_per_prompt)
    _positive_int("detection_steps", detection_steps)
    if timesteps is None and sigmas is None:
        _positive_int("num_inference_steps", num_inference_steps)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(
            "this UNet is guidance-distilled (time_cond_proj_dim is set); GUARD needs a model sampled with"
            " classifier-free guidance"
        )
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        callback_tensor_inputs = callback_on_step_end.tensor_inputs
    return callback, callback_steps, config, guidance_rescale, list(callback_tensor_inputs or ["latents"])


def _batch_size(prompt, prompt_embeds) -> int:
    """Prompts in the call; an empty prompt list is an error here, before any work."""
    if prompt is None:
        if prompt_embeds is None:
            raise ValueError("pass prompt (a string or a non-empty list of strings) or prompt_embeds")
        return prompt_embeds.shape[0]
    if isinstance(prompt, str):
        return 1
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt is an empty list: pass at least one prompt")
    return len(prompt)


def check_latents(latents: Optional[torch.Tensor], rows: int, channels: int, height: int, width: int, scale: int):
    """Given latents must be (prompts x images, C, H / vae_scale, W / vae_scale): refused before any work."""
    if latents is None:
        return
    expected = (rows, channels, height // scale, width // scale)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor of shape {expected}, got {type(latents).__name__}")
    if tuple(latents.shape) != expected:
        raise ValueError(
            f"latents must have shape {expected} (prompts x images per prompt, UNet in_channels, height and width"
            f" / {scale}), got {tuple(latents.shape)}"
        )


#: SD's callback tensors: where each lives in a branch's conditioning.
SD_PAIRED = {"prompt_embeds": ("encoder_hidden_states",)}
SD_NEGATIVE = {"negative_prompt_embeds": ("encoder_hidden_states",)}


def method_embeddings(pipe, config: GuardConfig, latents, timestep, negative_embeds, prompt_embeds,
                      images_per_prompt: int, generator, added_cond_kwargs=None):  # fmt: skip
    """The prompt's embeddings as the method changes them before sampling, and Wen et al.'s record.

    "wen": optimised at the first step's noise (``added_cond_kwargs``: the unconditional and the
    prompt's added conditioning, SDXL's); "somepalli": Gaussian noise, drawn after the latents so
    that a seed gives the same latents; any other method: unchanged.
    """
    optimization = None
    if config.method == "wen":
        if added_cond_kwargs is not None and "image_embeds" in added_cond_kwargs[1]:
            raise ValueError("method 'wen' does not take IP-Adapter inputs")
        prompt_embeds, optimization = optimize_prompt_embeddings(
            pipe.unet,
            pipe.scheduler,
            latents,
            timestep,
            negative_embeds,
            prompt_embeds,
            images_per_prompt,
            learning_rate=config.wen_learning_rate,
            iterations=config.wen_iterations,
            target_loss=config.wen_target_loss,
            added_cond_kwargs=added_cond_kwargs,
        )
    elif config.method == "somepalli":
        noise = randn_tensor(prompt_embeds.shape, generator=generator, device=latents.device, dtype=prompt_embeds.dtype)
        prompt_embeds = prompt_embeds + config.embedding_noise_scale * noise
    return prompt_embeds, optimization


class StableDiffusionGuardPipeline(GuardSamplingMixin, StableDiffusionPipeline):
    """Stable Diffusion (1.x / 2.x, epsilon or v-prediction) sampled with GUARD.

    Load it like the parent: ``StableDiffusionGuardPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")``
    or ``StableDiffusionGuardPipeline.from_pipe(existing_pipeline)``; then pass ``guard_config=``
    (a :class:`GuardConfig`, a preset name such as ``"attenuation"``, or None for the published
    GUARD run) to ``__call__``.
    """

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
        ip_adapter_image: Optional[PipelineImageInput] = None,
        ip_adapter_image_embeds: Optional[list[torch.Tensor]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Union[Callable, PipelineCallback, MultiPipelineCallbacks, None] = None,
        callback_on_step_end_tensor_inputs: Optional[list[str]] = None,
        guard_config: Union[GuardConfig, str, None] = None,
        attention_backend: str = "auto",
        detection_steps: int = 1,
        **kwargs,
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
        detection_steps: how many first UNet calls the memorization scores on the report
            (``report.detection``, see :mod:`guard.detection`) average over; the gate's own
            ``gate_steps`` when that is longer.

        Returns :class:`GuardPipelineOutput` (a ``StableDiffusionPipelineOutput`` with ``report``),
        or the parent's tuple ``(images, nsfw_content_detected)`` with ``return_dict=False`` (the
        report is then ``pipe.guard_report``). The guidance schedule's progress is ``step / number
        of inference steps``. A callback that changes ``pipeline._guidance_scale`` changes GUARD's
        attraction scale from the next step on (at 1 or below, as in the parent, guidance stops:
        one row per image, the prompt's prediction); ``guidance_rescale`` rescales the guided
        prediction against the plain prompt's, as the parent rescales CFG's.
        """
        # 1. Check everything before any work.
        callback, callback_steps, config, guidance_rescale, callback_on_step_end_tensor_inputs = check_call(
            self.unet, kwargs, guard_config, guidance_scale, guidance_rescale, num_images_per_prompt, detection_steps,
            num_inference_steps, timesteps, sigmas, output_type, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        sample_size = self.unet.config.sample_size
        size_h, size_w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size[:2]
        height = height or size_h * self.vae_scale_factor
        width = width or size_w * self.vae_scale_factor
        batch_size = _batch_size(prompt, prompt_embeds)
        self.check_inputs(
            prompt, height, width, callback_steps, negative_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        rows = batch_size * num_images_per_prompt
        check_latents(latents, rows, self.unet.config.in_channels, height, width, self.vae_scale_factor)
        self._guidance_scale = config.guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Prepare: prompt embeddings per branch, timesteps, latents.
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
        num_keys = prompt_embeds.shape[1]
        negative, positive = {"encoder_hidden_states": negative_prompt_embeds}, {"encoder_hidden_states": None}
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, rows, True
            )  # each cat([negative, positive]), as the parent lays it out under CFG
            negative["added_cond_kwargs"] = {"image_embeds": [embeds.chunk(2)[0] for embeds in image_embeds]}
            positive["added_cond_kwargs"] = {"image_embeds": [embeds.chunk(2)[1] for embeds in image_embeds]}
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = self.prepare_latents(
            rows, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        added = positive.get("added_cond_kwargs")
        prompt_embeds, optimization = method_embeddings(
            self, config, latents, timesteps[0], negative_prompt_embeds, prompt_embeds, num_images_per_prompt,
            generator, None if added is None else (negative["added_cond_kwargs"], added),
        )  # fmt: skip
        positive["encoder_hidden_states"] = prompt_embeds
        self._num_timesteps = len(timesteps)

        # 3. The denoising loop (the branches' conditioning packed by the denoiser for each call), the report.
        latents, report = self._guard_sample(
            config, prompt, batch_size, num_images_per_prompt, num_keys, negative, positive, latents, timesteps,
            num_inference_steps, device=device, attention_backend=attention_backend, detection_steps=detection_steps,
            guidance_rescale=guidance_rescale, extra_step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_tensor_inputs=callback_on_step_end_tensor_inputs, callback_tensors=(SD_PAIRED, SD_NEGATIVE),
            callback=callback, callback_steps=callback_steps,
        )  # fmt: skip
        report.embedding_optimization = optimization

        # 4. Decoding.
        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not x for x in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()

        if not return_dict:
            return image, has_nsfw_concept
        return GuardPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept, report=report)
