"""Test session setup: Triton runs in its CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton compiles anything, hence before any test module
imports guard_kernels.triton_fused.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
