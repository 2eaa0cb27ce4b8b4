"""Scalar argument checks shared by the kernel API and ``guard.GuardConfig``.

One owner for "is this a usable real number": both layers accept and refuse exactly the same
values (Python, NumPy and 0-d torch numbers alike; never bools or strings; never NaN or inf).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch


def real_number(name: str, value: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None) -> float:
    """``value`` as a finite Python float, or a one-line TypeError / ValueError naming ``name``.

    Accepted: Python ints and floats, NumPy integer and floating scalars (and 0-d arrays of
    them), 0-d integer or floating torch tensors (read with ``.item()``: a host transfer, so
    check settings once, outside any loop). Refused: bools of every kind, strings, complex
    numbers, tensors with more than one element, NaN, inf, and values outside
    [``minimum``, ``maximum``].
    """
    number = _as_real(value)
    if number is None:
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {number:g}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {number:g}")
    return number


def _as_real(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if hasattr(value, "dtype") and hasattr(value, "ndim") and value.ndim == 0:
        value = value.item() if hasattr(value, "item") else value  # a 0-d NumPy array
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return None
    if isinstance(value, numbers.Real):  # int, float, NumPy integer and floating scalars
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range: infinite, refused as such
            return math.inf if value > 0 else -math.inf
    return None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)
