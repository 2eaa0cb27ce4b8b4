"""The GUARD denoising loop, shared by every GUARD pipeline class.

A pipeline class prepares a run (prompt embeddings per branch, latents, timesteps) and decodes its
result; what lies between is here, written once: the branch inputs of one UNet call per step
(unconditional | attenuated prompt | plain prompt, arXiv 2603.00133 sec. 3), the attention
processors for the chosen method, the memorization gate, the combination of predictions, the
scheduler step, callbacks, the progress bar and the report. A second pipeline (another model
family) reuses :class:`GuardSamplingMixin` and supplies only its own conditioning.

Nothing here reads a device tensor back to the host inside the loop; the report's single
transfer happens after it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from diffusers.loaders import TextualInversionLoaderMixin

from .attention import attenuate_cross_attention
from .config import GuardConfig
from .guidance import combine_predictions, memorization_gate, repulsion_weight
from .report import GuardReport, position_labels, token_labels


class GuardDenoiser:
    """One run's GUARD steps: branch inputs, one UNet call, the gate, the guidance, the scheduler step.

    It keeps what the run accumulates on the device: the memorization gate's decision (made on
    the first UNet call when ``config.gate_threshold`` is set) and each call's guidance norms.
    ``total_steps`` is the number of inference steps; second-order schedulers (Heun, KDPM2) make
    ``order`` UNet calls per step, and every call of a step uses that step's schedule weight.
    """

    def __init__(self, config: GuardConfig, total_steps: int, order: int = 1) -> None:
        self.config = config
        self.total_steps = total_steps
        self.order = order
        self.cleared: Optional[torch.Tensor] = None  # (images,) bool once the gate has decided
        self.norms: list[torch.Tensor] = []  # per UNet call: (3, images) on the device

    def schedule_index(self, call_index: int) -> int:
        """The inference step a UNet call belongs to (its position in the guidance schedule)."""
        return min(call_index // self.order, self.total_steps - 1)

    def __call__(
        self,
        unet: torch.nn.Module,
        scheduler,
        latents: torch.Tensor,
        timestep,
        call_index: int,
        unet_inputs: dict[str, Any],
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        extra_step_kwargs: Optional[dict[str, Any]] = None,
    ) -> torch.Tensor:
        """The next latents. ``unet_inputs`` are the UNet's conditioning, already stacked per branch."""
        config = self.config
        model_input = torch.cat([latents] * config.branches)
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, timestep)
        noise_pred = unet(
            model_input, timestep, **unet_inputs, cross_attention_kwargs=cross_attention_kwargs, return_dict=False
        )[0]
        if config.gate_threshold is not None and self.cleared is None:
            self.cleared = memorization_gate(*noise_pred.chunk(3), config)
        guided, norms = combine_predictions(
            noise_pred,
            self.schedule_index(call_index),
            self.total_steps,
            config,
            timestep=timestep,
            return_norms=True,
            cleared=self.cleared,
        )
        self.norms.append(torch.stack(tuple(norms)))
        return scheduler.step(guided, timestep, latents, **(extra_step_kwargs or {}), return_dict=False)[0]


class GuardSamplingMixin:
    """GUARD's sampling for a diffusers text-to-image pipeline (``self.unet``, ``self.scheduler``,
    ``self.tokenizer``, ``self.progress_bar`` and ``self.interrupt`` come from the pipeline)."""

    def _prompt_token_ids(self, prompt) -> list[list[int]]:
        """Token ids exactly as ``encode_prompt`` tokenizes ``prompt`` (str or list)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(self, TextualInversionLoaderMixin):
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
        ).input_ids

    def _guard_attention(self, config: GuardConfig, prompt, images_per_prompt: int, rows: int, num_keys: int,
                         device, backend: str):  # fmt: skip
        """The attention processors the method needs, as a context manager yielding its session (or None).

        "guard"/"attenuation": the spike rule on the attenuated branch's rows; "ren": Ren et al.'s
        per-row token modulation; the others run the UNet's own processors.
        """
        if config.attenuates:
            spike_rows = torch.zeros(config.branches * rows, dtype=torch.bool, device=device)
            spike_rows[rows : 2 * rows] = True
            return attenuate_cross_attention(self.unet, spike_rows, config, backend=backend)
        if config.method == "ren":
            token_scale, token_bias = self._ren_token_modulation(prompt, config, rows, images_per_prompt, num_keys)
            return attenuate_cross_attention(
                self.unet,
                None,
                config,
                backend=backend,
                token_scale=token_scale.to(device),
                token_bias=token_bias.to(device),
            )
        return contextlib.nullcontext(None)

    def _ren_token_modulation(self, prompt, config, rows, images_per_prompt, num_keys):
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
        return scale, bias

    def _guard_denoise(
        self,
        denoiser: GuardDenoiser,
        latents: torch.Tensor,
        timesteps,
        num_inference_steps: int,
        unet_inputs: dict[str, Any],
        *,
        extra_step_kwargs: dict[str, Any],
        cross_attention_kwargs: Optional[dict[str, Any]],
        callback_on_step_end: Optional[Callable],
        callback_tensor_inputs: list[str],
        callback_tensors: dict[str, Callable[[], torch.Tensor]],
        callback_updates: dict[str, Callable[[torch.Tensor], None]],
    ) -> torch.Tensor:
        """The denoising loop; returns the final latents.

        ``callback_tensor_inputs`` are the names the callback asked for; ``callback_tensors``
        names what it may read (a getter each, latents aside) and ``callback_updates`` what it may
        replace (a setter each): the pipeline keeps its own conditioning, so that a callback's
        change reaches the next UNet call.
        """
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latents = denoiser(
                    self.unet, self.scheduler, latents, t, i, unet_inputs, cross_attention_kwargs, extra_step_kwargs
                )
                if callback_on_step_end is not None:
                    available = {"latents": latents, **{name: get() for name, get in callback_tensors.items()}}
                    requested = {name: available[name] for name in callback_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, requested) or {}
                    latents = outputs.pop("latents", latents)
                    for name, value in outputs.items():
                        if name in callback_updates:
                            callback_updates[name](value)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        return latents

    def _guard_report(
        self, config: GuardConfig, prompt, batch_size: int, images_per_prompt: int, num_keys: int, session,
        denoiser: GuardDenoiser,
    ) -> GuardReport:  # fmt: skip
        """Move the run's device-side records to the host (its only transfer of them)."""
        if prompt is None:
            prompts, labels = [None] * batch_size, [position_labels(num_keys)] * batch_size
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            labels = [token_labels(self.tokenizer, row, num_keys) for row in self._prompt_token_ids(prompt)]
        rows = batch_size * images_per_prompt
        steps_run = len(denoiser.norms)
        if steps_run:
            norms = torch.stack(denoiser.norms).float().cpu().view(steps_run, 3, batch_size, images_per_prompt)
        else:
            norms = torch.zeros(0, 3, batch_size, images_per_prompt)
        cleared = None if denoiser.cleared is None else denoiser.cleared.cpu().view(batch_size, images_per_prompt)
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
                if cleared is not None:  # a cleared image's attenuated rows did not act: their flags do not count
                    stacked = stacked * (~cleared).view(1, batch_size, images_per_prompt, 1)
                flag_counts = stacked.sum(dim=2).permute(1, 0, 2).contiguous()
        repulsion = [
            repulsion_weight(denoiser.schedule_index(i), denoiser.total_steps, config)
            if config.method == "guard"
            else 0.0
            for i in range(steps_run)
        ]
        return GuardReport(
            config=config,
            prompts=prompts,
            token_labels=labels,
            layer_names=layer_names,
            layer_heads=layer_heads,
            flag_counts=flag_counts,
            images_per_prompt=images_per_prompt,
            num_steps=steps_run,
            repulsion_weights=repulsion,
            attraction_norms=norms[:, 0],
            repulsion_norms=norms[:, 1],
            cosines=norms[:, 2],
            cleared=cleared,
        )
