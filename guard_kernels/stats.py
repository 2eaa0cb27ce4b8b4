"""Per-token attention statistics and GUARD's spike rule.

The spike rule is shared by every backend so that "which tokens are spikes" has exactly one
definition, the one of the GUARD paper (arXiv 2603.00133) as its released code computes it: peaks
over all queries of the raw logit, z-score over the non-BOS tokens with the unbiased standard
deviation (+ 1e-6), strict ``z > threshold``, BOS never a spike.
"""

from typing import NamedTuple

import torch

#: Added to the standard deviation before dividing, as in the paper's released code.
SPIKE_STD_EPS = 1e-6


class AttentionStats(NamedTuple):
    """Optional auxiliary outputs of :func:`guard_kernels.cross_attention`, each (B, H, Nk).

    max_logit: max over queries of ``scale * q.k`` before any modulation (float32; float64 for
        float64 inputs); NaN if any of those logits is NaN, as ``torch.amax``.
    mass: sum over queries of the final softmax probabilities, i.e. how much attention each
        token received after attenuation and masking (NaN where a NaN probability entered it).
    spikes: bool, tokens the spike rule attenuated; all False on rows outside ``spike_rows``.
    """

    max_logit: torch.Tensor
    mass: torch.Tensor
    spikes: torch.Tensor


def spike_mask_from_peaks(peaks: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return the bool spike mask (same shape as ``peaks``) of GUARD's z-score rule.

    ``peaks[..., j]`` is token j's peak logit over all queries. Token 0 (BOS) is excluded from the
    statistics and never flagged. With fewer than two non-BOS tokens the unbiased standard
    deviation is undefined, so nothing is flagged (instead of propagating NaN); a NaN or infinite
    peak among tokens 1..Nk-1 makes every z-score NaN, so nothing is flagged either.
    """
    spikes = torch.zeros(peaks.shape, dtype=torch.bool, device=peaks.device)
    if peaks.shape[-1] < 3:
        return spikes
    body = peaks[..., 1:]
    mu = body.mean(dim=-1, keepdim=True)
    sigma = body.std(dim=-1, unbiased=True, keepdim=True)
    z = (body - mu) / (sigma + SPIKE_STD_EPS)
    spikes[..., 1:] = z > threshold
    return spikes
