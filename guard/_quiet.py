"""Keep the ``guard`` command's output to what it has to say.

transformers announces, on every import of diffusers' pipelines without torchvision installed,
that its image processors fall back to PIL. guard never uses those processors' torchvision
backend, so the notice says nothing a ``guard`` user can act on; this filter drops exactly that
message and nothing else.
"""

from __future__ import annotations

import logging

_NOTICE = "requires torchvision (not installed)"


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _NOTICE not in record.getMessage()


def quiet_optional_imports() -> None:
    """Install the filter on the logger that emits the notice (idempotent)."""
    emitter = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionNotice) for f in emitter.filters):
        emitter.addFilter(_DropTorchvisionNotice())
