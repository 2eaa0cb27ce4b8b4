"""guard: GUARD memorization mitigation for diffusers text-to-image pipelines.

Public names are imported lazily, so ``import guard`` (and the ``guard`` command's start-up) does
not pay for importing diffusers until a pipeline is needed.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:  # the one version is pyproject.toml's
    __version__ = version("guard")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "GuardConfig": "config",
    "PRESETS": "config",
    "StableDiffusionGuardPipeline": "pipeline",
    "GuardPipelineOutput": "pipeline",
    "StableDiffusionXLGuardPipeline": "pipeline_sdxl",
    "GuardXLPipelineOutput": "pipeline_sdxl",
    "attenuate_cross_attention": "attention",
    "AttenuationSession": "attention",
    "GuardCrossAttnProcessor": "attention",
    "guard_guidance": "guidance",
    "memorization_gate": "guidance",
    "cfg_guidance": "guidance",
    "combine_predictions": "guidance",
    "repulsion_weight": "guidance",
    "transition_guidance": "guidance",
    "GuardReport": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
