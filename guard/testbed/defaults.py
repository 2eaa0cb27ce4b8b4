"""The testbed's shipped GUARD setting, stored as data beside the weights.

``python -m guard.testbed.evaluate --sweep --write-default`` measures the copy threshold and
records a first setting chosen on the exact captions; ``python -m guard.testbed.detection_study
--gate-sweep --write-default`` re-chooses the setting on their variants (docs/testbed_detection.md
for the numbers and the reason). Both write ``weights/guard_default.json``; the CLI and the demo read
it through :func:`testbed_guard_config`, so changing the shipped default needs no code change.
"""

from __future__ import annotations

import json
from pathlib import Path

from .assets import WEIGHTS_DIR

GUARD_DEFAULT_FILE = "guard_default.json"


def default_guard_config(path: str | Path | None = None):
    """The GuardConfig the testbed ships as its default (``path``: a pipeline folder or the JSON file)."""
    from ..config import GuardConfig

    target = _default_file(path)
    record = json.loads(target.read_text())
    settings = record.get("config")
    if not isinstance(settings, dict):
        raise ValueError(f"{target} must hold an object with a 'config' mapping of GuardConfig fields")
    # JSON holds tuples (blocks, gate_weights) as lists
    return GuardConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()})


def testbed_guard_config(path: str | Path | None = None):
    """The GUARD setting recorded with a testbed folder (the shipped one for None); the published
    setting for a folder that records none."""
    from ..config import GuardConfig

    try:
        return default_guard_config(path)
    except FileNotFoundError:
        if path is None:
            raise  # the shipped testbed always carries its setting
        return GuardConfig.preset("guard")


def copy_threshold(path: str | Path | None = None) -> float:
    """Own-image SSIM above which a testbed sample counts as a copy of its training image.

    Measured, not guessed: ``guard.testbed.evaluate`` sets it just above what honest samples of the
    same shape captions (trigger removed) score against the memorized image, and records why.
    """
    target = _default_file(path)
    record = json.loads(target.read_text())
    value = record.get("copy_threshold")
    if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{target} must hold a copy_threshold in (0, 1), got {value!r}")
    return float(value)


def _default_file(path: str | Path | None) -> Path:
    target = Path(path) if path is not None else WEIGHTS_DIR
    if target.is_dir():
        target = target / GUARD_DEFAULT_FILE
    if not target.is_file():
        raise FileNotFoundError(f"no shipped GUARD setting at {target}")
    return target


def write_testbed_defaults(
    config,
    reason: str,
    threshold: float,
    threshold_reason: str,
    guidance_scale_reason: str,
    folder: str | Path | None = None,
) -> Path:
    """Record the default GuardConfig, the copy threshold, and why each was chosen."""
    target = (Path(folder) if folder is not None else WEIGHTS_DIR) / GUARD_DEFAULT_FILE
    record = {
        "config": _config_fields(config),
        "reason": reason,
        "guidance_scale_reason": guidance_scale_reason,
        "copy_threshold": round(float(threshold), 4),
        "copy_threshold_reason": threshold_reason,
    }
    target.write_text(json.dumps(record, indent=2) + "\n")
    return target


def record_testbed_setting(config, reason: str, folder: str | Path | None = None) -> Path:
    """Replace the recorded GUARD setting and its reason, keeping the copy threshold and the rest."""
    target = _default_file(folder)
    record = json.loads(target.read_text())
    record.update(config=_config_fields(config), reason=reason)
    target.write_text(json.dumps(record, indent=2) + "\n")
    return target


def _config_fields(config) -> dict:
    import dataclasses

    fields = dataclasses.asdict(config)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}
