"""A tiny model registry in the spirit of timm's ``register_model``.

Entry points only declare hyper-parameters and call one builder; looking up an unknown name fails
with the list of valid names, so a typo on the command line is answered with the fix.
"""
from typing import Callable, Dict, List

from util.run.errors import UserError

# the standard ViT sizes (ViT / DeiT / MAE papers), shared by the pre-training and fine-tuning registries
VIT_ARCHS: Dict[str, Dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
_HEADS_BY_WIDTH = {a["embed_dim"]: a["num_heads"] for a in VIT_ARCHS.values()}


def vit_heads(width: int) -> int:
    """Attention heads for a ViT of this width, which weights cannot tell: the standard size's count
    (ViT-Ti 3 ... ViT-H 16), else one head per 64 channels (at least one)."""
    return _HEADS_BY_WIDTH.get(width, max(1, width // 64))


class Registry:
    """Maps model names to factory functions.

    Args:
        kind: what the registry holds, used in error messages (e.g. ``"pre-training model"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable] = {}

    def register(self, fn: Callable, name: str = "") -> Callable:
        """Register ``fn`` under ``name`` (default: the function's own name); usable as a decorator."""
        name = name or fn.__name__
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = fn
        return fn

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise UserError(
                f"Unknown {self.kind} {name!r}. Valid names: {', '.join(self.names())}."
            )
        return self._entries[name]
