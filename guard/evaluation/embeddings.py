"""Embedding arithmetic shared by the SSCD and CLIP scores: unit vectors and a per-prompt score."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def l2_normalize(embeddings: torch.Tensor, what: str = "embeddings") -> torch.Tensor:
    """Row-wise unit vectors in float32; a zero or non-finite row is an error, not a silent NaN."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{what} must be a (N, D) matrix, got shape {tuple(embeddings.shape)}")
    embeddings = embeddings.detach().float()
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{what} contain non-finite values")
    norms = embeddings.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError(f"{what} contain an all-zero vector, which has no direction")
    return embeddings / norms


@dataclass(frozen=True)
class PromptScore:
    """One prompt's score and the per-generated-image values it averages."""

    score: float
    per_image: tuple[float, ...]
