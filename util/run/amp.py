"""Mixed precision: the --amp dtype, autocast and the gradient scaler."""
import contextlib
from typing import Optional

from util.run.errors import UserError

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """``--amp``: bf16 / fp16 / none; by default bf16 on GPUs that support it, else fp16; none on CPU."""
    if amp in (None, "", "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp {amp!r}: choose one of bf16, fp16, none.")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or --amp none.")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """Loss scaling only for fp16 (bf16 and fp32 need none; the disabled scaler is a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
