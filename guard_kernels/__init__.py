"""Fused cross-attention kernels with GUARD's per-token statistics and spike attenuation.

``cross_attention`` is the whole public API: one call computes softmax(l') V, where l' are the
logits with GUARD's statistically detected spike tokens attenuated, plus (opt-in) per-token
statistics, without ever materialising the (Nq x Nk) attention map on the Triton path.
"""

from importlib.metadata import PackageNotFoundError, version

from .api import cross_attention
from .stats import AttentionStats, spike_mask_from_peaks

__all__ = ["cross_attention", "AttentionStats", "spike_mask_from_peaks"]
try:  # the one version is pyproject.toml's (guard_kernels ships in the guard distribution)
    __version__ = version("guard")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
