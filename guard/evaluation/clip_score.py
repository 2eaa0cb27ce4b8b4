"""CLIP score: how well generated images still match their prompt (higher is better).

The paper uses OpenCLIP ViT-g-14 (``laion2b_s12b_b42k``) and scores each image against the original
prompt. The score is the plain cosine of the L2-normalised image and text embeddings (not x100,
not clipped at 0; the paper's values are 0.18-0.35), averaged over a prompt's generations, then over
prompts.

``open_clip`` (package ``open-clip-torch``) is optional and imported only by
:meth:`ClipScorer.from_open_clip`: it requires torchvision, so it is never a dependency of this
package. Any pair of encode functions can be injected instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image

from .embeddings import PromptScore, l2_normalize

PAPER_CLIP_MODEL = "ViT-g-14"
PAPER_CLIP_PRETRAINED = "laion2b_s12b_b42k"


class ClipScorer:
    """CLIP score from injected encoders.

    ``encode_images(list of PIL) -> (N, D)`` and ``encode_texts(list of str) -> (M, D)``.
    """

    def __init__(
        self,
        encode_images: Callable[[list[Image.Image]], torch.Tensor],
        encode_texts: Callable[[list[str]], torch.Tensor],
        *,
        batch_size: int = 16,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.encode_images = encode_images
        self.encode_texts = encode_texts
        self.batch_size = batch_size

    @classmethod
    def from_open_clip(
        cls,
        model_name: str = PAPER_CLIP_MODEL,
        pretrained: str = PAPER_CLIP_PRETRAINED,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> "ClipScorer":
        """The paper's scorer via open_clip; ``pretrained`` may be a tag or a local checkpoint path.

        open_clip fetches a tag's weights into its cache on first use (this package never does);
        pass a local file to stay offline.
        """
        try:
            import open_clip
        except ImportError:
            raise ImportError(
                "CLIP score needs open_clip: pip install open-clip-torch (it pulls in torchvision and a "
                "matching torch build, so install it only in an environment meant for it)"
            ) from None
        device = torch.device(device)
        model, _, image_transform = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device
        )
        model.eval()
        tokenizer = open_clip.get_tokenizer(model_name)

        @torch.no_grad()
        def encode_images(images: list[Image.Image]) -> torch.Tensor:
            return model.encode_image(torch.stack([image_transform(image) for image in images]).to(device))

        @torch.no_grad()
        def encode_texts(texts: list[str]) -> torch.Tensor:
            return model.encode_text(tokenizer(texts).to(device))

        return cls(encode_images, encode_texts, batch_size=batch_size)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), float32 on the CPU."""
        if len(images) == 0:
            raise ValueError("images is empty")
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            parts.append(self._checked(self.encode_images(batch), len(batch), "encode_images"))
        return l2_normalize(torch.cat(parts), "CLIP image embeddings")

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (M, D), float32 on the CPU."""
        if len(texts) == 0 or not all(isinstance(text, str) for text in texts):
            raise ValueError("texts must be a non-empty sequence of strings")
        parts = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            parts.append(self._checked(self.encode_texts(batch), len(batch), "encode_texts"))
        return l2_normalize(torch.cat(parts), "CLIP text embeddings")

    @staticmethod
    def _checked(output: object, rows: int, name: str) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != rows:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"{name} must return a ({rows}, D) tensor, got {shape}")
        return output.detach().float().cpu()

    def score(self, caption: str, images: Sequence[Image.Image]) -> PromptScore:
        """Mean cosine between each image and ``caption``, with the per-image values."""
        return prompt_clip_score(self.embed_texts([caption]), self.embed_images(images))


def prompt_clip_score(text: torch.Tensor, images: torch.Tensor) -> PromptScore:
    """Per-prompt CLIP score from a (1, D) text embedding and (N, D) image embeddings (normalised here)."""
    text = l2_normalize(text, "CLIP text embedding")
    images = l2_normalize(images, "CLIP image embeddings")
    if text.shape[0] != 1:
        raise ValueError(f"expected one text embedding, got {text.shape[0]}")
    if text.shape[1] != images.shape[1]:
        raise ValueError(f"embedding sizes differ: text {text.shape[1]}, images {images.shape[1]}")
    cosines = (images @ text[0]).tolist()
    return PromptScore(score=sum(cosines) / len(cosines), per_image=tuple(cosines))
