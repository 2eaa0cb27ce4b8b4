"""What the fused kernel can hold, shared by the dispatcher (which falls back) and the launcher."""

#: Largest key count held in one tile (Nk is the text length: 77, 154, 231).
MAX_KEYS = 256
#: Largest head dim held in one tile.
MAX_HEAD_DIM = 256
