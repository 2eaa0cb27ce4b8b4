"""Wen et al.'s inference-time mitigation: shrink the text-conditional noise before sampling.

"Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR 2024; released
code github.com/YuxinWenRick/diffusion_memorization, ``local_sd_pipeline.py``, ``aug_prompt``):
at the first denoising step, from the very noise the image will be sampled from, the prompt's
embedding is optimised so that ``||eps(x_T, c) - eps(x_T, empty)||_2`` (over all of the prompt's
images and latent elements at once, as released) falls below a target; then sampling runs plain
classifier-free guidance with that embedding. As released: AdamW (torch's defaults besides the
learning rate), at most ``iterations`` steps, the check against the target before each update,
every text position optimised except BOS, whose gradient is zeroed, the unconditional
embedding left as it is. Each prompt has its own embedding and optimiser, so a batch of prompts
gives each one what a call of its own would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .sampling import stack_conditioning, take_rows


@dataclass(frozen=True)
class EmbeddingOptimization:
    """Per prompt: the loss at each check against the target, and how many updates it took."""

    losses: list[list[float]]
    updates: list[int]


def optimize_prompt_embeddings(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    timestep,
    negative: torch.Tensor,
    positive: torch.Tensor,
    images_per_prompt: int,
    *,
    learning_rate: float,
    iterations: int,
    target_loss: float,
    unet_kwargs: Optional[dict[str, Any]] = None,
    added_cond_kwargs: Optional[tuple[dict[str, Any], dict[str, Any]]] = None,
) -> tuple[torch.Tensor, EmbeddingOptimization]:
    """The prompt embeddings after Wen et al.'s optimisation, laid out as ``positive``.

    ``latents`` (prompts x images rows), ``negative`` and ``positive`` are the pipeline's, rows in
    prompt-major order with each prompt's ``images_per_prompt`` rows together (``positive``'s rows
    of one prompt are equal: the prompt's embedding repeated). ``timestep`` is the first step's.
    ``added_cond_kwargs``: the UNet's added conditioning of the unconditional and of the prompt's
    rows (SDXL's pooled embeddings and time ids), one row per image like ``negative``; each update
    takes the rows of the prompts still optimised.
    """
    prompts = positive.shape[0] // images_per_prompt
    embeddings = [positive[p * images_per_prompt].detach().clone().requires_grad_(True) for p in range(prompts)]
    optimizers = [torch.optim.AdamW([embedding], lr=learning_rate) for embedding in embeddings]
    scaled = scheduler.scale_model_input(latents, timestep)
    losses: list[list[float]] = [[] for _ in range(prompts)]
    updates = [0] * prompts
    done = [False] * prompts
    for _ in range(iterations):
        active = [p for p in range(prompts) if not done[p]]
        if not active:
            break
        rows = [r for p in active for r in range(p * images_per_prompt, (p + 1) * images_per_prompt)]
        index = torch.tensor(rows, device=latents.device)
        with torch.enable_grad():  # the pipeline samples under no_grad; the embeddings need their graph
            cond = torch.cat([embeddings[p].unsqueeze(0).expand(images_per_prompt, -1, -1) for p in active])
            states = torch.cat([negative.index_select(0, index), cond])
            sample = torch.cat([scaled.index_select(0, index)] * 2)
            kwargs = dict(unet_kwargs or {})
            if added_cond_kwargs is not None:
                kwargs["added_cond_kwargs"] = stack_conditioning([take_rows(part, index) for part in added_cond_kwargs])
            noise = unet(sample, timestep, encoder_hidden_states=states, return_dict=False, **kwargs)[0]
            eps_u, eps_c = noise.chunk(2)
            delta = (eps_c - eps_u).float().view(len(active), images_per_prompt, -1)
            per_prompt = torch.linalg.vector_norm(delta.flatten(1), dim=1)  # one loss per prompt, as released
            values = per_prompt.tolist()  # the released check against the target reads the loss
            updating = []
            for slot, p in enumerate(active):
                losses[p].append(values[slot])
                if values[slot] <= target_loss:
                    done[p] = True
                else:
                    updating.append(slot)
            if not updating:
                break
            grads = torch.autograd.grad(per_prompt[updating].sum(), [embeddings[active[slot]] for slot in updating])
        for slot, grad in zip(updating, grads):
            p = active[slot]
            grad = grad.clone()
            grad[0] = 0  # BOS stays as encoded
            embeddings[p].grad = grad
            optimizers[p].step()
            optimizers[p].zero_grad()
            updates[p] += 1
    optimized = torch.cat(
        [embedding.detach().unsqueeze(0).expand(images_per_prompt, -1, -1) for embedding in embeddings]
    ).to(positive.dtype)
    return optimized, EmbeddingOptimization(losses=losses, updates=updates)
