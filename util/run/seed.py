"""Seeds: every random stream is a pure function of (seed, position), so a resumed run draws what an
uninterrupted one would have drawn."""
import random

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (e.g. base seed, epoch, sample index)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def seed_host(seed: int) -> None:
    """Seed torch's CPU generator, numpy and python's ``random``: the same CPU numbers as
    :func:`seed_everything`, for per-sample augmentation in loader workers.

    ``torch.manual_seed`` also seeds CUDA, XPU and MTIA; where those are not initialised (a CPU
    machine, or a forked loader worker) each of them records ``traceback.format_stack()`` to replay
    later, a cost per call comparable to decoding an ImageNet image (docs/PERFORMANCE.md).
    """
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
