"""The public entry point: validate arguments once, then dispatch to the Triton or PyTorch path.

The dispatch is a PyTorch custom op (``torch.ops.guard_kernels.cross_attention``, or
``cross_attention_stats`` with statistics), so that ``torch.compile`` traces a call with no graph
break: everything before the op is plain Python on shapes, dtypes, devices and Python numbers,
which dynamo traces (a 0-d tensor scalar is read with ``.item()``, which breaks the graph: pass
Python floats in compiled code).
"""

import os
from typing import Optional

import torch

from .limits import TRITON_DTYPES, tile_limit_error
from .reference import compute_dtype, torch_cross_attention
from .stats import AttentionStats
from .validation import real_number

BACKENDS = ("auto", "triton", "torch")
TORCH_DTYPES = TRITON_DTYPES + (torch.float64,)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when the Triton package imports (it may still lack a GPU driver)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _positive_scale(value) -> float:
    """The logit scale: finite and > 0 (zero would make every query attend uniformly)."""
    scale = real_number("scale", value)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale:g}")
    return scale


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            expected = "(B, Nq, H, D)" if name == "q" else "(B, Nk, H, D)"
            raise ValueError(f"{name} must have shape {expected} (4 dims), got shape {tuple(t.shape)}")
        if t.dtype not in TORCH_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride on its last (head) dim, got strides {tuple(t.stride())};"
                " pass a .view of the projection output, or call .contiguous()"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, num_queries, heads, head_dim = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape (B, Nk, H, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: expected "
            f"(B={batch}, Nk, H={heads}, D={head_dim})"
        )
    if num_queries < 1 or k.shape[1] < 1 or head_dim < 1:
        raise ValueError(
            f"q and k need at least one query, key and channel, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )


def _token_tensor(name: str, value, batch: int, heads: int, num_keys: int, device, dtype) -> Optional[torch.Tensor]:
    """Normalise token_scale/token_bias to a (B, H, Nk) view in the accumulation dtype."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be None or a tensor of shape (B, Nk) or (B, H, Nk), got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}")
    if tuple(value.shape) == (batch, num_keys):
        value = value.unsqueeze(1)
    elif tuple(value.shape) != (batch, heads, num_keys):
        raise ValueError(
            f"{name} must have shape (B, Nk)=({batch}, {num_keys}) or (B, H, Nk)=({batch}, {heads}, {num_keys}),"
            f" got {tuple(value.shape)}"
        )
    return value.to(dtype).expand(batch, heads, num_keys)


def _spike_rows(value, batch: int, device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"spike_rows must be None or a bool tensor of shape (B,)=({batch},), got {type(value).__name__}"
        )
    if value.dtype != torch.bool:
        raise TypeError(f"spike_rows must be a bool tensor of shape (B,)=({batch},), got dtype {value.dtype}")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"spike_rows must have shape (B,)=({batch},), got {tuple(value.shape)}")
    # A CPU mask for CUDA inputs is copied without blocking the host.
    return value.to(device, non_blocking=True)


def _resolve_backend(backend: str, q: torch.Tensor, num_keys: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    too_large = tile_limit_error(q.shape[-1], num_keys)
    if backend == "auto":
        usable = q.is_cuda and q.dtype in TRITON_DTYPES and too_large is None and triton_available()
        return "triton" if usable else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not q.is_cuda and not _interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before guard_kernels is imported;"
                " use backend='torch' (or 'auto') on the CPU"
            )
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {q.dtype}")
        if too_large is not None:
            raise ValueError(f"{too_large}; use backend='torch'")
    return backend


# ----------------------------------------------------------------------------- the custom ops
# Dynamo does not trace into a custom op: the Triton launcher (or the PyTorch path) runs as one
# graph node, and a fake implementation gives its output shapes and dtypes. A custom op's return
# schema is fixed, hence two ops: ``guard_kernels::cross_attention`` returns ``out`` only (the
# Triton path allocates nothing else), ``guard_kernels::cross_attention_stats`` returns
# ``(out, max_logit, mass, spikes)``. Both take ``(q, k, v, scale, spike_rows, spike_threshold,
# spike_scale, token_scale, token_bias, backend)`` as cross_attention passes them: validated, token
# tensors as (B, H, Nk) views in the accumulation dtype, backend resolved to "torch" or "triton".
# Neither has a backward (an inference kernel): backpropagating through one raises. (The PyTorch
# path's own backward failed already for gradients through q, k or the token tensors: its softmax
# fix-up is in place.) On torch < 2.4 (no torch.library.custom_op) they are plain functions.

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
    raise ValueError(f"the ops' backend must be 'torch' or 'triton' (resolved by cross_attention), got {backend!r}")


def cross_attention_op(
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
    """The op ``guard_kernels::cross_attention``: the output (B, Nq, H, D). No backward."""
    out, _ = _run(q, k, v, scale, spike_rows, spike_threshold, spike_scale, token_scale, token_bias, backend, False)
    return out


def cross_attention_stats_op(
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
    """The op ``guard_kernels::cross_attention_stats``: ``(out, max_logit, mass, spikes)``. No backward."""
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
    cross_attention_op = torch.library.custom_op(f"{NAMESPACE}::cross_attention", mutates_args=())(cross_attention_op)
    cross_attention_op.register_fake(_fake_cross_attention)
    cross_attention_stats_op = torch.library.custom_op(f"{NAMESPACE}::cross_attention_stats", mutates_args=())(
        cross_attention_stats_op
    )
    cross_attention_stats_op.register_fake(_fake_cross_attention_stats)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    spike_rows: Optional[torch.Tensor] = None,
    spike_threshold: float = 0.1,
    spike_scale: float = 0.3,
    token_scale: Optional[torch.Tensor] = None,
    token_bias: Optional[torch.Tensor] = None,
    return_stats: bool = False,
    backend: str = "auto",
):
    """Cross-attention with GUARD's per-token statistics and spike attenuation, fused.

    Args:
        q: (B, Nq, H, D) queries; k, v: (B, Nk, H, D) keys/values. Any strides with unit stride on
            D, so ``to_q(x).view(B, N, H, D)`` needs no copy.
        scale: logit scale, finite and > 0; default ``D ** -0.5``.
        spike_rows: None or bool (B,): rows on which the spike rule runs (GUARD's positive rows).
            On those rows, tokens j >= 1 whose peak logit over all queries has a z-score above
            ``spike_threshold`` (any finite number) get their logits multiplied by ``spike_scale``
            (finite, >= 0) for every query. Scalars may be Python, NumPy or 0-d torch numbers
            (:func:`guard_kernels.validation.real_number`, the check ``guard.GuardConfig`` makes).
        token_scale, token_bias: None, (B, Nk) or (B, H, Nk). Final logits are
            ``l * token_scale * (spike_scale if spike else 1) + token_bias``; a ``-inf`` bias masks
            a token, and a row with every token masked outputs zeros.
        return_stats: a bool; also return :class:`~guard_kernels.stats.AttentionStats`.
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton" or "torch".

    Returns:
        ``out`` (B, Nq, H, D), contiguous, in q's dtype; or ``(out, stats)`` with ``return_stats``.

    Non-finite inputs are not checked for (that would cost a host sync); both backends treat NaN
    and inf in q, k, v, token_scale and token_bias alike, by IEEE arithmetic and these rules. A
    query whose final logits include NaN or +inf outputs NaN in every channel (a NaN or +inf
    token_bias thus makes every query of its (row, head) NaN); a -inf final logit masks its key,
    and a query with every key masked outputs zeros. v enters through P V: a NaN in v makes that
    channel NaN for every query, an inf makes it inf, or NaN for queries that give its key
    probability 0 (0 * inf; fp16/bf16 kernels round unnormalised probabilities to that dtype
    first, so one below its smallest subnormal counts as 0). Statistics propagate NaN:
    ``max_logit`` is NaN for a token if any query's raw logit for it is NaN; ``mass`` is NaN
    where a NaN probability entered its sum (every token of a (row, head) with a NaN query); on a
    spike row whose peaks of tokens 1..Nk-1 include NaN or inf the spike rule flags nothing (the
    mean, hence every z-score, is NaN). Infinite q or k give logits by IEEE rules (inf * 0 =
    NaN), except that on a GPU float32 q and k go through a 3-pass TF32 dot, which turns an
    infinite element into NaN logits.

    The computation is one custom op, ``torch.ops.guard_kernels.cross_attention`` (or
    ``cross_attention_stats`` with ``return_stats``), so ``torch.compile`` traces a call with no
    graph break. The ops have no backward (an inference kernel): backpropagating through them
    raises.
    """
    _check_qkv(q, k, v)
    batch, _, heads, head_dim = q.shape
    num_keys = k.shape[1]
    scale = head_dim**-0.5 if scale is None else _positive_scale(scale)
    # The same checks as guard.GuardConfig: a z-score threshold may be negative, a logit factor not.
    spike_threshold = real_number("spike_threshold", spike_threshold)
    spike_scale = real_number("spike_scale", spike_scale, minimum=0.0)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    spike_rows = _spike_rows(spike_rows, batch, q.device)
    backend = _resolve_backend(backend, q, num_keys)
    acc = compute_dtype(q.dtype)
    token_scale = _token_tensor("token_scale", token_scale, batch, heads, num_keys, q.device, acc)
    token_bias = _token_tensor("token_bias", token_bias, batch, heads, num_keys, q.device, acc)

    args = (q, k, v, scale, spike_rows, spike_threshold, spike_scale, token_scale, token_bias, backend)
    if return_stats:
        out, max_logit, mass, spikes = cross_attention_stats_op(*args)
        return out, AttentionStats(max_logit=max_logit, mass=mass, spikes=spikes)
    return cross_attention_op(*args)
