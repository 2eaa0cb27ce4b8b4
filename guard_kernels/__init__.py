"""Fused cross-attention kernels with GUARD's per-token statistics and spike attenuation.

``cross_attention`` is the whole public API: one call computes softmax(l') V, where l' are the
logits with GUARD's statistically detected spike tokens attenuated, plus (opt-in) per-token
statistics, without ever materialising the (Nq x Nk) attention map on the Triton path.
"""

from .api import cross_attention
from .stats import AttentionStats, spike_mask_from_peaks

__all__ = ["cross_attention", "AttentionStats", "spike_mask_from_peaks"]
__version__ = "0.1.0"
