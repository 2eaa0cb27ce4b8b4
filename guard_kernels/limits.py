"""What the fused kernel can hold, owned here for the dispatcher (which falls back) and the launcher."""

from typing import Optional

import torch

#: Largest key count held in one tile (Nk is the text length: 77, 154, 231).
MAX_KEYS = 256
#: Largest head dim held in one tile.
MAX_HEAD_DIM = 256
#: Operand dtypes the kernels compile for (float64 has no tensor-core dot).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tile_limit_error(head_dim: int, num_keys: int) -> Optional[str]:
    """Why one register tile cannot hold a (D, Nk) problem, as a one-line message; None when it can.

    ``guard_kernels.cross_attention(backend="auto")`` falls back to the PyTorch path on a message,
    ``backend="triton"`` and the launcher raise it: one rule, so the two can never disagree.
    """
    if head_dim > MAX_HEAD_DIM or num_keys > MAX_KEYS:
        return (
            f"the Triton kernel supports D <= {MAX_HEAD_DIM} and Nk <= {MAX_KEYS} (one register tile),"
            f" got D={head_dim}, Nk={num_keys}"
        )
    return None
