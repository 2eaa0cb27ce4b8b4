"""Which process of a launch does which work, and how the processes wait for each other.

A single process needs nothing. Under ``accelerate launch`` (or ``torchrun``; ``WORLD_SIZE`` > 1)
:func:`current_shard` asks accelerate's ``PartialState`` for the process index, count, device and
barrier; accelerate is imported only then. The runner splits the work that no rows file holds when
a launch starts, in one order every process computes alike, round-robin by batch
(:func:`assign`), so a resumed launch may have any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")

#: How long a process waits for the others at a barrier (a failed process ends the launch sooner:
#: accelerate's launcher stops every process when one fails).
BARRIER_TIMEOUT = timedelta(hours=6)


def _no_wait() -> None:
    return None


@dataclass(frozen=True)
class Shard:
    """This process's place in a launch: ``index`` of ``count``, a ``barrier`` and its ``device``."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = _no_wait
    device: Optional[torch.device] = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"Shard.count must be a positive int, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ValueError(f"Shard.index must be in 0..{self.count - 1}, got {self.index!r}")

    @property
    def is_main(self) -> bool:
        return self.index == 0


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def current_shard() -> Shard:
    """This process's shard: one process alone, or its place in an accelerate / torchrun launch."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        return Shard()
    try:
        from accelerate import PartialState
    except ImportError:
        raise ImportError(
            f"WORLD_SIZE={world}: a multi-process launch needs accelerate (pip install 'guard[distributed]')"
        ) from None
    # Without a GPU, accelerate's launcher starts torchrun workers that must be told to use gloo on the CPU.
    # The processes wait for each other after loading the model and after their share of the work; the
    # default 10-30 min collective timeout could end a healthy run whose processes load or finish far apart.
    cpu = _flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    device = torch.device("cpu") if state.device is None or state.device.type == "cpu" else state.device
    return Shard(state.process_index, state.num_processes, state.wait_for_everyone, device)


def assign(batches: Sequence[T], shard: Shard) -> list[T]:
    """This shard's batches: every ``count``-th one from ``index``."""
    return list(batches[shard.index :: shard.count])
