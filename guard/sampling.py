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
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from .attention import AttenuationSession, attenuate_cross_attention
from .config import GuardConfig
from .detection import ScoreAccumulator, attention_entropy, gate_score, is_cleared, spike_share, wen_score
from .guidance import DynamicTransition, combine_predictions, guard_guidance, guidance_cosine, repulsion_weight
from .report import GuardReport, position_labels, token_labels


def stack_conditioning(parts: list):
    """Concatenate branch conditionings along the batch: tensors, or dicts and lists of them
    (SDXL's added conditioning, IP-Adapter image embeddings)."""
    first = parts[0]
    if isinstance(first, dict):
        return {key: stack_conditioning([part[key] for part in parts]) for key in first}
    if isinstance(first, list):
        return [stack_conditioning([part[i] for part in parts]) for i in range(len(first))]
    return torch.cat(parts)


def take_rows(value, index: torch.Tensor):
    """The rows ``index`` of a conditioning (tensor, or dicts and lists of them)."""
    if isinstance(value, dict):
        return {key: take_rows(item, index) for key, item in value.items()}
    if isinstance(value, list):
        return [take_rows(item, index) for item in value]
    return value.index_select(0, index)


class GuardDenoiser:
    """One run's GUARD steps: branch inputs, one UNet call, detection and the gate, the guidance,
    the scheduler step.

    It keeps what the run accumulates on the device: the memorization scores of the first
    ``detection_steps`` UNet calls (:mod:`guard.detection`), the gate's decision when
    ``config.gate_threshold`` is set, and each call's guidance norms. After the decision a
    cleared image runs only its unconditional and plain-prompt rows, so the UNet batch is packed:
    ``[uncond (all images) | attenuated (flagged images) | plain (all images)]``; the decision is
    the run's one host synchronisation. ``total_steps`` is the number of inference steps;
    second-order schedulers (Heun, KDPM2) make ``order`` UNet calls per step, and every call of a
    step uses that step's schedule weight.
    """

    def __init__(
        self,
        config: GuardConfig,
        total_steps: int,
        order: int = 1,
        *,
        images: int,
        session: Optional[AttenuationSession] = None,
        detection_steps: int = 1,
        guidance_rescale: float = 0.0,
    ) -> None:
        self.config = config
        self.guidance_rescale = guidance_rescale
        self.guided = True  # False once a callback switches guidance off (guidance scale <= 1)
        dynamic = config.method == "jain" and config.transition == "dynamic"
        self.transition = DynamicTransition(config) if dynamic else None
        self.total_steps = total_steps
        self.order = order
        self.images = images
        self.session = session
        gate_steps = config.gate_steps if config.gate_threshold is not None else 1
        if config.gate_threshold is not None and detection_steps > gate_steps:
            # The gate decides when the scores are complete; scoring further would move its decision.
            raise ValueError(
                f"detection_steps={detection_steps} exceeds the gate's gate_steps={gate_steps}: the gate decides on "
                f"the first gate_steps UNet calls; score at most that many (or raise GuardConfig.gate_steps)"
            )
        self.detection_steps = max(detection_steps, gate_steps)
        self.fix_after = gate_steps  # spike_tokens="first-step": the UNet calls before the tokens are fixed
        self.cleared: Optional[torch.Tensor] = None  # (images,) bool once the gate has decided
        self.flagged: Optional[torch.Tensor] = None  # images keeping an attenuated row (None: all of them)
        self.norms: list[torch.Tensor] = []  # per UNet call: (3, images) on the device
        self.scores = ScoreAccumulator()
        self.calls = 0
        self.guided_calls = 0  # UNet calls before a callback switched guidance off (all of them otherwise)
        self._negative = self._positive = None
        self._stacked = None
        self._counted: Optional[torch.Tensor] = None  # spike counts at the last detection call

    def schedule_index(self, call_index: int) -> int:
        """The inference step a UNet call belongs to (its position in the guidance schedule)."""
        return min(call_index // self.order, self.total_steps - 1)

    def set_guidance_scale(self, scale: float) -> None:
        """Follow a guidance scale a callback set (as diffusers' callbacks do through
        ``pipeline._guidance_scale``): a new scale from the next UNet call on, and at 1 or below no
        guidance at all, as in the parent pipeline: one row per image, the prompt's prediction."""
        if not self.guided or scale == self.config.guidance_scale:
            return
        if scale <= 1.0:
            self.guided = False
            self._stacked = None
            if self.session is not None:
                self.session.spike_rows = None
        else:
            self.config = self.config.replace(guidance_scale=scale)
            if self.transition is not None:
                self.transition.config = self.config

    def set_conditioning(self, negative: dict[str, Any], positive: dict[str, Any]) -> None:
        """The UNet's conditioning per branch, each with one row per image: ``negative`` feeds the
        unconditional branch, ``positive`` the attenuated and the plain-prompt branches."""
        self._negative, self._positive = negative, positive
        self._stacked = None

    @property
    def conditioning(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._negative, self._positive

    def _unet_inputs(self) -> dict[str, Any]:
        if self._stacked is None:
            negative, positive = self._negative, self._positive
            if not self.guided:
                parts = [positive]
            elif self.config.branches == 2:
                parts = [negative, positive]
            elif self.flagged is None:
                parts = [negative, positive, positive]
            else:
                parts = [negative, take_rows(positive, self.flagged), positive]
            self._stacked = stack_conditioning(parts)
        return self._stacked

    def _model_input(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return latents
        if self.config.branches == 2:
            return torch.cat([latents, latents])
        if self.flagged is None:
            return torch.cat([latents] * 3)
        return torch.cat([latents, latents.index_select(0, self.flagged), latents])

    def __call__(
        self,
        unet: torch.nn.Module,
        scheduler,
        latents: torch.Tensor,
        timestep,
        call_index: int,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        extra_step_kwargs: Optional[dict[str, Any]] = None,
    ) -> torch.Tensor:
        """The next latents."""
        config, n = self.config, self.images
        detecting = self.calls < self.detection_steps
        session = self.session
        if config.spike_tokens == "first-step" and self.calls == self.fix_after and self.guided:
            self._fix_spike_tokens()
        read_mass = detecting and session is not None and config.method == "guard" and bool(session.attenuated_layers)
        if read_mass:  # Ren et al.'s entropy reads the plain prompt's rows
            session.reset_mass()
            session.mass_rows = slice(2 * n, 3 * n)
        model_input = self._model_input(latents)
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, timestep)
        noise_pred = unet(
            model_input,
            timestep,
            **self._unet_inputs(),
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=False,
        )[0]
        if read_mass:
            session.mass_rows = None
        if not self.guided:  # guidance switched off: the prompt's own prediction
            off = torch.tensor([0.0, 0.0, float("nan")], device=latents.device)  # no attraction, repulsion, cosine
            self.norms.append(off.view(3, 1).expand(3, n))
            self.calls += 1
            return scheduler.step(noise_pred, timestep, latents, **(extra_step_kwargs or {}), return_dict=False)[0]
        if config.method == "guard":
            eps_u, eps_neg = noise_pred[:n], noise_pred[noise_pred.shape[0] - n :]
            if self.flagged is None:
                eps_pos = noise_pred[n : 2 * n]
            else:  # cleared images have no attenuated row; their GUARD terms are never used
                eps_pos = eps_neg.index_copy(0, self.flagged, noise_pred[n : noise_pred.shape[0] - n])
            if detecting:
                self._detect(eps_u, eps_neg, eps_pos, session if read_mass else None)
            if self.calls == self.detection_steps - 1 and config.gate_threshold is not None:
                self._decide(latents.device)
            guided, norms = guard_guidance(
                eps_u,
                eps_pos,
                eps_neg,
                self.schedule_index(call_index),
                self.total_steps,
                config,
                return_norms=True,
                cleared=self.cleared,
            )
        else:
            if detecting:
                self.scores.add(wen=wen_score(*noise_pred.chunk(2)))
            if self.transition is not None:  # Jain et al.'s dynamic transition point
                guided, norms = self.transition(*noise_pred.chunk(2), return_norms=True)
            else:
                guided, norms = combine_predictions(
                    noise_pred,
                    self.schedule_index(call_index),
                    self.total_steps,
                    config,
                    timestep=timestep,
                    return_norms=True,
                )
        self.guided_calls += 1
        if self.guidance_rescale > 0:  # Lin et al. 2024, sec. 3.4, against the plain prompt's prediction
            plain = noise_pred[noise_pred.shape[0] - n :]
            guided = rescale_noise_cfg(guided, plain, guidance_rescale=self.guidance_rescale)
        self.norms.append(torch.stack(tuple(norms)))
        self.calls += 1
        return scheduler.step(guided, timestep, latents, **(extra_step_kwargs or {}), return_dict=False)[0]

    def _detect(self, eps_u, eps_neg, eps_pos, session: Optional[AttenuationSession]) -> None:
        entropy = share = None
        if session is not None:
            masses = session.attention_mass()
            if masses:
                entropy = torch.stack([attention_entropy(mass) for mass in masses.values()]).mean(dim=0)
            total, checks = session.image_flags(self.images)
            if total is not None:  # the counts so far, per image; this call's are the increase since the last one
                this_call = total if self._counted is None else total - self._counted
                self._counted = total
                share = spike_share(this_call, checks)
        self.scores.add(
            wen=wen_score(eps_u, eps_neg),
            cosine=guidance_cosine(eps_u, eps_pos, eps_neg),
            entropy=entropy,
            spike_share=share,
        )

    def _fix_spike_tokens(self) -> None:
        """``spike_tokens="first-step"``: each guided image's spike tokens from now on are those its
        first calls flagged at least half as often as its most-flagged token (on the device)."""
        session, n = self.session, self.images
        if session is None or session.spike_rows is None:
            return
        total = session.image_flags(n)[0]  # (images, tokens)
        if total is None:
            return
        fixed = (total > 0) & (2 * total >= total.amax(dim=1, keepdim=True))
        fixed[:, 0] = False  # BOS is never a spike
        session.fixed_spikes = fixed if self.flagged is None else fixed.index_select(0, self.flagged)

    def _decide(self, device) -> None:
        """The gate: clear images whose score says "not memorized", and pack the batch for the rest
        of the run. Reading the decision is the run's one host synchronisation."""
        config, n = self.config, self.images
        score = gate_score(config, self.scores.means())
        self.cleared = is_cleared(config.gate_detector, score, config.gate_threshold)
        flagged = torch.nonzero(~self.cleared.cpu()).flatten()  # the one host sync
        if len(flagged) == n:
            return
        self.flagged = flagged.to(device)
        self._stacked = None
        if self.session is not None:
            m = len(flagged)
            self.session.spike_rows = slice(n, n + m) if m else None
            trash = torch.full((n,), n, dtype=torch.long, device=device)
            self.session.count_index = torch.cat([trash, self.flagged, trash])


def _get(conditioning: dict[str, Any], path: tuple[str, ...]):
    for key in path:
        conditioning = conditioning[key]
    return conditioning


def _with(conditioning: dict[str, Any], path: tuple[str, ...], value) -> dict[str, Any]:
    """A copy of ``conditioning`` with the entry at ``path`` replaced (the rest shared, not copied)."""
    if len(path) == 1:
        return {**conditioning, path[0]: value}
    return {**conditioning, path[0]: _with(conditioning[path[0]], path[1:], value)}


class CallbackEmbeddings:
    """What ``callback_on_step_end`` sees of the conditioning, laid out as the parent pipeline lays
    it out under classifier-free guidance: each ``paired`` name (SD's ``prompt_embeds``; SDXL's
    also ``add_text_embeds`` and ``add_time_ids``) is ``cat([negative, positive])`` of the entry
    at its path in the branches' conditioning, each ``negative`` name the negative rows alone; a
    callback that returns a tensor of the same shape changes the branches from the next UNet call
    on (the other entries, e.g. IP-Adapter image embeddings, stay as they are)."""

    def __init__(self, denoiser: GuardDenoiser, paired: dict, negative: dict) -> None:
        self.denoiser = denoiser
        self.paired, self.negative = paired, negative

    def tensors(self) -> dict[str, torch.Tensor]:
        negative, positive = self.denoiser.conditioning
        shown = {}
        for name, path in self.paired.items():
            neg, pos = _get(negative, path), _get(positive, path)
            shown[name] = torch.cat([neg, pos]) if self.denoiser.guided else pos
        shown.update({name: _get(negative, path) for name, path in self.negative.items()})
        return shown

    def update(self, outputs: dict[str, torch.Tensor]) -> None:
        negative, positive = self.denoiser.conditioning
        changed = False
        for name, path in self.paired.items():
            if name not in outputs:
                continue
            value, pos = outputs[name], _get(positive, path)
            guided = (2 * pos.shape[0],) + tuple(pos.shape[1:])
            if tuple(value.shape) == guided:
                neg_value, pos_value = value.chunk(2)
                negative, positive = _with(negative, path, neg_value), _with(positive, path, pos_value)
            elif not self.denoiser.guided and tuple(value.shape) == tuple(pos.shape):
                positive = _with(positive, path, value)  # guidance off (e.g. SDCFGCutoffCallback): the prompt's rows
            else:
                raise ValueError(
                    f"callback_on_step_end returned {name} of shape {tuple(value.shape)}; GUARD takes "
                    f"cat([negative, positive]) of shape {guided}, as the parent pipeline lays it out (or, once "
                    f"guidance is off, the positive rows, {tuple(pos.shape)})"
                )
            changed = True
        for name, path in self.negative.items():
            if name not in outputs:
                continue
            value, neg = outputs[name], _get(negative, path)
            if value.shape != neg.shape:
                raise ValueError(
                    f"callback_on_step_end returned {name} of shape {tuple(value.shape)}, expected {tuple(neg.shape)}"
                )
            negative, changed = _with(negative, path, value), True
        if changed:
            self.denoiser.set_conditioning(negative, positive)


@contextlib.contextmanager
def _attenuated_branch(unet, config: GuardConfig, rows: int, num_keys: int, device, backend: str):
    """The spike rule on the attenuated branch, rows ``[rows, 2 rows)`` of GUARD's layout, with one
    spike count row per image (and one more that the other rows' zero flags land in)."""
    spike_rows = slice(rows, 2 * rows)
    with attenuate_cross_attention(unet, spike_rows, config, backend=backend) as session:
        elsewhere = torch.full((rows,), rows, dtype=torch.long, device=device)
        images = torch.arange(rows, device=device)
        session.count_index = torch.cat([elsewhere, images] + [elsewhere] * (config.branches - 2))
        session.prepare_counts(rows + 1, num_keys, device)
        yield session


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
            return _attenuated_branch(self.unet, config, rows, num_keys, device, backend)
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

    def _guard_sample(
        self,
        config: GuardConfig,
        prompt,
        batch_size: int,
        images_per_prompt: int,
        num_keys: int,
        negative: dict[str, Any],
        positive: dict[str, Any],
        latents: torch.Tensor,
        timesteps,
        num_inference_steps: int,
        *,
        device,
        attention_backend: str,
        detection_steps: int,
        guidance_rescale: float,
        extra_step_kwargs: dict[str, Any],
        cross_attention_kwargs: Optional[dict[str, Any]],
        callback_on_step_end: Optional[Callable],
        callback_tensor_inputs: list[str],
        callback_tensors: tuple[dict, dict],
        callback: Optional[Callable] = None,
        callback_steps: Optional[int] = None,
        schedule_steps: Optional[int] = None,
    ) -> tuple[torch.Tensor, GuardReport]:
        """A prepared run from its branches' conditioning to its final latents and report: the
        method's attention processors, the denoiser, the loop, the report (its one host transfer).

        ``negative`` / ``positive``: the UNet's conditioning of the unconditional and of the
        prompt's branches (see :meth:`GuardDenoiser.set_conditioning`); ``callback_tensors``:
        :class:`CallbackEmbeddings`' ``paired`` and ``negative`` maps for this pipeline's callback
        tensors; ``schedule_steps``: the length of GUARD's guidance schedule when the run stops
        early (SDXL's ``denoising_end``), else ``num_inference_steps``.
        """
        rows = batch_size * images_per_prompt
        attention = self._guard_attention(config, prompt, images_per_prompt, rows, num_keys, device, attention_backend)
        with attention as session:
            denoiser = GuardDenoiser(
                config,
                schedule_steps or num_inference_steps,
                self.scheduler.order,
                images=rows,
                session=session,
                detection_steps=detection_steps,
                guidance_rescale=guidance_rescale,
            )
            denoiser.set_conditioning(negative, positive)
            latents = self._guard_denoise(
                denoiser,
                latents,
                timesteps,
                num_inference_steps,
                extra_step_kwargs=extra_step_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                callback_tensor_inputs=callback_tensor_inputs,
                callback_embeddings=CallbackEmbeddings(denoiser, *callback_tensors),
                callback=callback,
                callback_steps=callback_steps,
            )
        report = self._guard_report(config, prompt, batch_size, images_per_prompt, num_keys, session, denoiser)
        self.guard_report = report
        return latents, report

    def _guard_denoise(
        self,
        denoiser: GuardDenoiser,
        latents: torch.Tensor,
        timesteps,
        num_inference_steps: int,
        *,
        extra_step_kwargs: dict[str, Any],
        cross_attention_kwargs: Optional[dict[str, Any]],
        callback_on_step_end: Optional[Callable],
        callback_tensor_inputs: list[str],
        callback_embeddings=None,
        callback: Optional[Callable] = None,
        callback_steps: Optional[int] = None,
    ) -> torch.Tensor:
        """The denoising loop; returns the final latents.

        ``callback_tensor_inputs`` are the names the callback asked for; ``callback_embeddings``
        (the pipeline's: ``tensors()`` and ``update(outputs)``) shows it the conditioning in the
        parent pipeline's layout and takes its changes back, so they reach the next UNet call.
        ``callback`` / ``callback_steps``: the parent's deprecated per-step callback.
        """
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        if denoiser.session is not None:  # the session reaches the processors as a call argument
            cross_attention_kwargs = {**(cross_attention_kwargs or {}), **denoiser.session.unet_kwargs}
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latents = denoiser(self.unet, self.scheduler, latents, t, i, cross_attention_kwargs, extra_step_kwargs)
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    if callback_embeddings is not None and set(callback_tensor_inputs) - {"latents"}:
                        available.update(callback_embeddings.tensors())
                    requested = {name: available[name] for name in callback_tensor_inputs}
                    outputs = dict(callback_on_step_end(self, i, t, requested) or {})
                    latents = outputs.pop("latents", latents)
                    denoiser.set_guidance_scale(self._guidance_scale)  # a callback may change it, as in the parent
                    if callback_embeddings is not None:
                        callback_embeddings.update(outputs)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        callback(i // getattr(self.scheduler, "order", 1), t, latents)
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
            if layer_names:  # count rows: one per image, then the rows nothing is counted for
                stacked = torch.stack([counts[name][:rows] for name in layer_names], dim=0)
                stacked = stacked.cpu().to(torch.int64).view(len(layer_names), batch_size, images_per_prompt, -1)
                if cleared is not None:  # a cleared image's attenuated rows did not act: their flags do not count
                    stacked = stacked * (~cleared).view(1, batch_size, images_per_prompt, 1)
                flag_counts = stacked.sum(dim=2).permute(1, 0, 2).contiguous()
        repulsion = [
            repulsion_weight(denoiser.schedule_index(i), denoiser.total_steps, config)
            if config.method == "guard" and i < denoiser.guided_calls
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
            detection=denoiser.scores.result(batch_size, images_per_prompt) if denoiser.scores.calls else None,
        )
