"""Decoding training images: the exact reference path, a faster CPU path, and GPU decoding.

A training transform that starts with a random resized crop (MAE's pre-training transform, MAE's
linear-probing transform, timm's fine-tuning transform) can be wrapped in :class:`DecodeTransform`;
the loaders then hand it the file's bytes (:class:`EncodedImage`) instead of a decoded image, and
the ``decode`` setting picks how those bytes become the crop:

* ``pil``: the reference. PIL decodes the whole image and converts it to RGB, then the wrapped
  transform runs unchanged: bit for bit what the transform does on an ImageFolder today.
* ``auto`` (default): JPEGs take the fast path below; every other format (the PNG digits) takes the
  reference path, so its output stays bit-identical.
* ``nvjpeg``: JPEGs are decoded on the GPU (:func:`batch_jpeg_decoder`: TorchCodec's or torchvision's
  ``decode_jpeg`` on a CUDA device), in the training process, one batch at a time
  (:func:`decode_pending`); the loader workers only read the bytes and draw the crop. Only for
  transforms that end with flip + ToTensor + Normalize (pre-training). Importing this module needs
  no GPU.

The fast path keeps the augmentation's random draws and their order: the crop box is drawn by the
wrapped crop's own ``get_params`` on an image opened for its header only (same size, so the same
box for the same generator state), then the flip. What changes is how the pixels of that box are
made:

1. the JPEG is decoded at 1/2, 1/4 or 1/8 of its size when the box is still at least the output
   size at that scale (libjpeg's DCT scaling: PIL ``draft``, or ``simplejpeg``, the same
   libjpeg-turbo decode without PIL's overhead, when installed). This is used only where it can be:
   a 224-pixel crop needs a box of 448 x 448 or more for a reduction of 2, which most ImageNet
   images (about 500 x 375) never offer, so on ImageNet at 224 it mostly applies to the large
   images; at lower resolutions (and for bigger photographs) it applies often;
2. without reduction, the box is resized by torchvision's uint8 antialiased resize, which
   reproduces PIL's bicubic / bilinear filter (mean difference under 0.3 grey levels) about three
   times faster; with one, PIL resamples the exact fractional box of the reduced image;
3. flip, ToTensor and Normalize run on the uint8 tensor with the reference's own arithmetic.

Measured differences to the reference on the same draws, in grey levels (0..255), over 60 crops each
of two photographs (``tests/test_decode.py`` asserts the bounds, ``tools/benchmark_data.py`` reports
them on its JPEGs): without reduction, mean absolute difference 0.014 (worst image 0.21, worst pixel
9, where one axis is upsampled and the other downsampled); with a reduction of 2 to 8, mean 0.5 to
1.1 (worst image 4.1, worst pixel 46, on edges: libjpeg averages each block before PIL's bicubic
filter, a slightly different low-pass). Bounds: :data:`EXACT_MEAN_TOLERANCE`,
:data:`REDUCED_MEAN_TOLERANCE` per image.
"""
import functools
import io
from collections import Counter
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

from util.run.errors import UserError

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

try:  # libjpeg-turbo without PIL's overhead; PIL's draft gives the same pixels when it is missing
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is in requirements.txt
    simplejpeg = None

DECODERS = ("auto", "pil", "nvjpeg")
REDUCTIONS = (8, 4, 2)  # the DCT scalings JPEG decoders offer (PIL's draft, simplejpeg)
# measured bounds on the mean absolute difference per image (grey levels, 0..255) between the fast
# and the reference crop of the same draws (tests/test_decode.py; the module docstring has the numbers)
EXACT_MEAN_TOLERANCE = 0.5  # no reduction: only the resize kernel (torchvision's uint8 vs PIL's) differs
REDUCED_MEAN_TOLERANCE = 5.0  # DCT-reduced decode: libjpeg's block average before PIL's filter


class EncodedImage(NamedTuple):
    """An image file's bytes and a name for messages (a path, or a shard and key)."""

    data: bytes
    name: str


class PendingJPEG(NamedTuple):
    """A JPEG to decode on the GPU: its bytes as a uint8 tensor, the crop box (top, left, height,
    width) drawn on the full-size image, and whether to flip it."""

    data: torch.Tensor
    box: Tuple[int, int, int, int]
    flip: bool


def read_encoded(path: str) -> EncodedImage:
    """Read an image file's bytes (the loader of an ImageFolder whose transform decodes itself)."""
    try:
        with open(path, "rb") as f:
            return EncodedImage(f.read(), str(path))
    except OSError as e:
        raise UserError(f"Cannot read image {path}: {e}. Remove or replace the file.") from None


def is_jpeg(data: bytes) -> bool:
    """JPEG files start with the SOI marker followed by another marker."""
    return data[:3] == b"\xff\xd8\xff"


def _bad_image(img: EncodedImage, e: Exception) -> UserError:
    return UserError(f"Cannot read image {img.name}: {e}. Remove or replace the file.")


_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb8(img: Image.Image) -> Image.Image:
    """``img`` as RGB, 8 bits per channel.

    16-bit grayscale images are scaled to 8 bits (the high byte, as Pillow itself reads 16-bit RGB
    PNGs), not clipped: ``convert("RGB")`` would turn every value above 255 into white.
    """
    if img.mode in _WIDE_GRAY:
        wide = np.asarray(img, dtype=np.int64).clip(0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8))  # mode L
    return img.convert("RGB")


def open_rgb(img: EncodedImage) -> Image.Image:
    """The reference decode: PIL opens the bytes and converts the whole image to RGB (:func:`rgb8`)."""
    try:
        return rgb8(Image.open(io.BytesIO(img.data)))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _bad_image(img, e) from None


def jpeg_header(img: EncodedImage) -> Optional[Tuple[int, int]]:
    """A JPEG's (width, height) from its header, or None when libjpeg cannot give RGB (CMYK, YCCK)."""
    try:
        if simplejpeg is not None:  # a few microseconds; PIL parses every marker (~50 us and more)
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(img.data)
            return None if colorspace in ("CMYK", "YCCK") else (w, h)
        head = Image.open(io.BytesIO(img.data))
        return head.size if head.mode in ("RGB", "L") else None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _bad_image(img, e) from None


def reduction(box_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) that keeps a ``box_hw`` crop at least ``out_hw``."""
    for s in REDUCTIONS:
        if box_hw[0] >= s * out_hw[0] and box_hw[1] >= s * out_hw[1]:
            return s
    return 1


def decode_jpeg(data: bytes, scale: int, size: Tuple[int, int]) -> np.ndarray:
    """Decode a JPEG to RGB at ``1/scale`` of its ``size`` (width, height): ``[ceil(H/s), ceil(W/s), 3]`` uint8.

    libjpeg's scaled decode computes each output pixel from one ``s x s`` block of the full image,
    so output pixel ``k`` covers full-size pixels ``[k s, (k + 1) s)``.
    """
    w, h = size
    if simplejpeg is not None:
        # the smallest output at least this big is exactly the 1/scale decode; same pixels as PIL's draft
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // scale), min_width=-(-w // scale))
    img = Image.open(io.BytesIO(data))
    if scale > 1:
        img.draft("RGB", (w // scale, h // scale))  # picks the largest reduction that keeps this size
    return np.array(img.convert("RGB"))


def _uint8_resized_crop(pixels: torch.Tensor, box: Tuple[int, int, int, int], size: Sequence[int],
                        interpolation: InterpolationMode) -> torch.Tensor:
    """Crop ``pixels`` [3, H, W] to ``box`` (top, left, height, width) and resize to ``size`` (h, w)
    with torchvision's antialiased uint8 kernels (PIL's filters, SIMD)."""
    i, j, h, w = box
    return F2.resize(pixels[:, i:i + h, j:j + w], list(size), interpolation=interpolation, antialias=True)


def fast_resized_crop(img: EncodedImage, size_wh: Tuple[int, int], box: Tuple[int, int, int, int],
                      out_hw: Sequence[int], interpolation: InterpolationMode) -> Tuple[torch.Tensor, int]:
    """The pixels of crop ``box`` (top, left, height, width; full-size coordinates) of a JPEG, resized
    to ``out_hw``: ``(uint8 [3, h, w], reduction used)``.

    Without reduction the box is exact and torchvision's uint8 resize does the work. With a
    reduction ``s`` the box falls between the reduced image's pixels (``i / s`` ...); rounding it to
    that grid would shift the crop by up to ``s / 2`` pixels and triple the difference to the
    reference, so PIL resamples the exact fractional box instead (on an image ``s**2`` times smaller).
    """
    i, j, h, w = box
    s = reduction((h, w), (out_hw[0], out_hw[1]))
    pixels = decode_jpeg(img.data, s, size_wh)  # [H/s, W/s, 3]
    if s == 1:
        return _uint8_resized_crop(torch.from_numpy(pixels).permute(2, 0, 1), box, out_hw, interpolation), 1
    resample = Image.BICUBIC if interpolation == InterpolationMode.BICUBIC else Image.BILINEAR
    crop = Image.fromarray(pixels).resize((out_hw[1], out_hw[0]), resample, box=(j / s, i / s, (j + w) / s, (i + h) / s))
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1), s


def _crop_op(op: Any) -> bool:
    """A random resized crop we can draw like (torchvision's, or timm's with one interpolation)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    if isinstance(op, transforms.RandomResizedCrop):
        return True
    return isinstance(op, RandomResizedCropAndInterpolation) and isinstance(op.interpolation, InterpolationMode)


def _tensor_tail(ops: Sequence[Any]) -> Optional[Tuple[float, torch.Tensor, torch.Tensor]]:
    """``(flip p, mean, std)`` when ``ops`` are exactly flip + ToTensor + Normalize (the pre-training tail)."""
    if (len(ops) == 3 and type(ops[0]) is transforms.RandomHorizontalFlip and type(ops[1]) is transforms.ToTensor
            and type(ops[2]) is transforms.Normalize and not ops[2].inplace):
        mean = torch.as_tensor(ops[2].mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(ops[2].std, dtype=torch.float32).view(-1, 1, 1)
        return float(ops[0].p), mean, std
    return None


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize of a uint8 [..., 3, H, W] tensor, with the reference's operations and order."""
    return x.float().div_(255).sub_(mean).div_(std)


class DecodeTransform:
    """A training transform that decodes the image itself (see the module docstring).

    Args:
        transform: a ``Compose`` whose first op is a random resized crop (torchvision's, or timm's
            ``RandomResizedCropAndInterpolation``); a transform without one always takes the reference path.
        decode: ``auto`` | ``pil`` | ``nvjpeg``.

    Called with a PIL image it is the wrapped transform; with an :class:`EncodedImage` it decodes as
    ``decode`` says. ``stats`` counts the paths taken in this process (``reference``, ``fast/1``,
    ``fast/2``, ..., ``nvjpeg``).
    """

    accepts_encoded = True  # loaders hand it EncodedImage instead of a decoded PIL image

    def __init__(self, transform: transforms.Compose, decode: str = "auto") -> None:
        if decode not in DECODERS:
            raise UserError(f"Unknown decoder {decode!r}; choose one of {', '.join(DECODERS)}.")
        ops = list(getattr(transform, "transforms", []))
        self.transform = transform
        self.decode = decode
        self.crop = ops[0] if ops and _crop_op(ops[0]) else None
        self.rest = transforms.Compose(ops[1:])
        self.tail = _tensor_tail(ops[1:])
        if decode == "nvjpeg" and (self.crop is None or self.tail is None):
            raise UserError("--decode nvjpeg supports the pre-training transform (random resized crop, flip, "
                            "normalize) only; use --decode auto for this one.")
        self.stats: Counter = Counter()

    def __repr__(self) -> str:
        return f"DecodeTransform(decode={self.decode!r}, {self.transform!r})"

    @property
    def out_hw(self) -> Tuple[int, int]:
        size = self.crop.size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))

    def __call__(self, img):
        if isinstance(img, Image.Image):
            return self.transform(img)
        if self.decode == "pil" or self.crop is None or not is_jpeg(img.data):
            return self._reference(img)
        size = jpeg_header(img)
        if size is None:  # CMYK / YCCK: PIL's own conversion to RGB
            return self._reference(img)
        box, flip = self.draw(size)
        if self.decode == "nvjpeg":
            self.stats["nvjpeg"] += 1
            return PendingJPEG(torch.frombuffer(bytearray(img.data), dtype=torch.uint8), box, flip)
        try:
            x, s = fast_resized_crop(img, size, box, self.out_hw, self.crop.interpolation)
        except (OSError, ValueError) as e:
            raise _bad_image(img, e) from None
        self.stats[f"fast/{s}"] += 1
        if self.tail is None:  # timm's tail (RandAugment, ...) works on PIL images and draws its own numbers
            return self.rest(Image.fromarray(x.permute(1, 2, 0).numpy()))
        _, mean, std = self.tail
        return _normalize(x.flip(-1) if flip else x, mean, std)

    def draw(self, size_wh: Tuple[int, int]) -> Tuple[Tuple[int, int, int, int], Optional[bool]]:
        """The random draws of the reference for an image of ``size_wh`` (width, height), in its order:
        the crop box (top, left, height, width) by the crop's own ``get_params``, then, with the
        pre-training tail, the flip (torchvision's RandomHorizontalFlip draws ``torch.rand(1) < p``);
        else None."""
        # get_params only reads the size: an expanded one-element tensor stands in for the image
        stand_in = torch.empty(1, 1, 1).expand(3, size_wh[1], size_wh[0])
        box = tuple(int(v) for v in self.crop.get_params(stand_in, self.crop.scale, self.crop.ratio))
        flip = bool(torch.rand(1) < self.tail[0]) if self.tail is not None else None
        return box, flip

    def _reference(self, img: EncodedImage):
        self.stats["reference"] += 1
        return self.transform(open_rgb(img))

    def finish_batch(self, images: List[Any], device: torch.device) -> torch.Tensor:
        """Decode a batch's :class:`PendingJPEG` items on ``device`` (``nvjpeg``); see :func:`decode_pending`."""
        _, mean, std = self.tail
        return decode_pending(images, self.out_hw, self.crop.interpolation, mean, std, device)


JPEG_DECODERS = ("torchcodec", "torchvision")


@functools.cache  # looked up once per process, not once per batch
def batch_jpeg_decoder(name: Optional[str] = None) -> Callable[[List[torch.Tensor], torch.device], List[torch.Tensor]]:
    """The batch stage's JPEG decoder: ``decode(list of 1-D uint8 CPU tensors, device) -> list of [3, H, W]``
    uint8 RGB, one nvJPEG call for the whole list on a CUDA device.

    ``name`` None: TorchCodec's ``decode_jpeg`` (torchcodec >= 0.16, which supersedes torchvision's image
    decoders, deprecated since torchvision 0.29) where it imports, else ``torchvision.io.decode_jpeg``
    (torchcodec is optional: its builds follow torch's, 0.16 needs torch >= 2.11). Both use nvJPEG on
    CUDA; ``tests/test_decode.py`` checks that their pixels agree on the CPU.
    """
    if name in (None, "torchcodec"):
        try:
            from torchcodec.decoders import decode_jpeg as tc_decode_jpeg
        except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch
            if name is not None:
                raise
        else:
            return lambda data, device: tc_decode_jpeg(list(data), mode="RGB", device=device)
    if name not in (None, "torchvision"):
        raise ValueError(f"Unknown JPEG decoder {name!r}: one of {', '.join(JPEG_DECODERS)}")
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg

    return lambda data, device: tv_decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)


def decode_pending(images: List[Any], out_hw: Sequence[int], interpolation: InterpolationMode,
                 mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                 decoder: Optional[str] = None) -> torch.Tensor:
    """Decode, crop, resize, flip and normalize a batch of :class:`PendingJPEG` on ``device``: [B, 3, h, w].

    Items that are already tensors (images that were not JPEGs, decoded on the CPU) are moved as
    they are. The JPEGs go to :func:`batch_jpeg_decoder` (``decoder``: its name, None for the
    default) in one call, which batches them on nvJPEG on a CUDA device (on the CPU it loops; the
    tests use that).
    """
    pending = [k for k, im in enumerate(images) if isinstance(im, PendingJPEG)]
    out: List[Optional[torch.Tensor]] = [None if isinstance(im, PendingJPEG) else im.to(device) for im in images]
    if pending:
        decoded = batch_jpeg_decoder(decoder)([images[k].data for k in pending], device)
        mean, std = mean.to(device), std.to(device)
        for k, pixels in zip(pending, decoded):
            (i, j, h, w), flip = images[k].box, images[k].flip
            x = _uint8_resized_crop(pixels, (i, j, h, w), out_hw, interpolation)
            out[k] = _normalize(x.flip(-1) if flip else x, mean, std)
    return torch.stack(out)


def collate(samples: List[Tuple[Any, ...]]) -> Tuple[Any, ...]:
    """``default_collate``, except that images of a batch holding :class:`PendingJPEG` stay a list
    (for :meth:`DecodeTransform.finish_batch` in the training process)."""
    from torch.utils.data import default_collate

    if any(isinstance(s[0], PendingJPEG) for s in samples):
        rest = default_collate([tuple(s[1:]) for s in samples])
        return ([s[0] for s in samples], *rest)
    return tuple(default_collate(samples))


def nvjpeg_finisher(transform: Any, device: Optional[torch.device]):
    """The batch stage of a ``nvjpeg`` transform on ``device`` (None when the transform has none).

    Raises :class:`UserError` when ``nvjpeg`` is asked for without a CUDA device.
    """
    if getattr(transform, "decode", None) != "nvjpeg":
        return None
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        raise UserError("--decode nvjpeg decodes on the GPU and needs a CUDA device; use --decode auto on the CPU.")
    return lambda images: transform.finish_batch(images, device)


def stats_summary(stats: Counter) -> str:
    """``"reference 12, fast/1 80 (no reduction), fast/2 8"``: the decode paths taken, for logs."""
    total = sum(stats.values()) or 1
    return ", ".join(f"{k} {v} ({100.0 * v / total:.0f}%)" for k, v in sorted(stats.items()))


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor, std: Sequence[float]) -> Tuple[float, float]:
    """Mean and max absolute difference of two normalized images, in grey levels (0..255)."""
    scale = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255
    d = ((a - b) * scale).abs()
    return float(d.mean()), float(d.max())

