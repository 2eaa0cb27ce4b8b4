"""The kernel as PyTorch custom ops, so that ``torch.compile`` sees one opaque node and no graph break.

Dynamo does not trace into a custom op: the Triton launcher (or the PyTorch path) runs as one graph
node, and a fake implementation gives its output shapes and dtypes. Its return schema is fixed, so:

* ``guard_kernels::cross_attention`` returns ``out`` only (the Triton path allocates nothing else);
* ``guard_kernels::cross_attention_stats`` returns ``(out, max_logit, mass, spikes)``.

Both take ``(q, k, v, scale, spike_rows, spike_threshold, spike_scale, token_scale, token_bias,
backend)`` already validated and normalised by :func:`guard_kernels.cross_attention` (token tensors
as (B, H, Nk) views in the accumulation dtype, ``backend`` resolved to "torch" or "triton"): call
that, not the ops. Neither op has a backward (an inference kernel): backpropagating through one
raises. (The PyTorch path's own backward failed already for gradients through q, k or the token
tensors: its softmax fix-up is in place.)
On torch < 2.4 (no ``torch.library.custom_op``) the two names are the plain Python functions.
"""

from typing import Optional

import torch

from .reference import compute_dtype, torch_cross_attention

#: The op namespace: torch.ops.guard_kernels.cross_attention / .cross_attention_stats.
NAMESPACE = "guard_kernels"
HAS_CUSTOM_OPS = hasattr(torch.library, "custom_op")


def _run(q, k, v, scale, spike_rows, spike_threshold, spike_scale, token_scale, token_bias, backend, return_stats):
    args = (q, k, v, scale, spike_rows, spike_threshold, spike_scale, token_scale, token_bias, return_stats)
    if backend == "triton":
        from .triton_fused import triton_cross_attention

        return triton_cross_attention(*args)
    if backend == "torch":
        return torch_cross_attention(*args)
    raise ValueError(f"the ops' backend must be 'torch' or 'triton' (resolved by the API), got {backend!r}")


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    spike_rows: Optional[torch.Tensor],
    spike_threshold: float,
    spike_scale: float,
    token_scale: Optional[torch.Tensor],
    token_bias: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """The output (B, Nq, H, D), arguments as guard_kernels.cross_attention passes them. No backward."""
    out, _ = _run(q, k, v, scale, spike_rows, spike_threshold, spike_scale, token_scale, token_bias, backend, False)
    return out


def cross_attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    spike_rows: Optional[torch.Tensor],
    spike_threshold: float,
    spike_scale: float,
    token_scale: Optional[torch.Tensor],
    token_bias: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, max_logit, mass, spikes)``: the output and the AttentionStats fields, unpacked. No backward."""
    out, stats = _run(q, k, v, scale, spike_rows, spike_threshold, spike_scale, token_scale, token_bias, backend, True)
    return out, stats.max_logit, stats.mass, stats.spikes


def _fake_cross_attention(q, k, v, *args):
    """Both paths return a fresh contiguous (B, Nq, H, D) output in q's dtype."""
    return q.new_empty(q.shape)


def _fake_cross_attention_stats(q, k, v, *args):
    shape = (q.shape[0], q.shape[2], k.shape[1])  # (B, H, Nk), contiguous
    acc = compute_dtype(q.dtype)
    return (
        q.new_empty(q.shape),
        q.new_empty(shape, dtype=acc),
        q.new_empty(shape, dtype=acc),
        q.new_empty(shape, dtype=torch.bool),
    )


if HAS_CUSTOM_OPS:
    cross_attention = torch.library.custom_op(f"{NAMESPACE}::cross_attention", mutates_args=())(cross_attention)
    cross_attention.register_fake(_fake_cross_attention)
    cross_attention_stats = torch.library.custom_op(f"{NAMESPACE}::cross_attention_stats", mutates_args=())(
        cross_attention_stats
    )
    cross_attention_stats.register_fake(_fake_cross_attention_stats)
