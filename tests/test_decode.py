"""The fast decode path (util.decode): the same random draws as the reference, pixels within the
measured tolerance, used only where it can be, and the exact reference kept (bit for bit on PNGs)."""
import io
import warnings

from util.data.datasets import IMAGENET_STD, finetune_transform, image_folder, pretrain_transform, with_decode
from util.data.decode import (
    EXACT_MEAN_TOLERANCE,
    JPEG_DECODERS,
    REDUCED_MEAN_TOLERANCE,
    DecodeTransform,
    EncodedImage,
    PendingJPEG,
    batch_jpeg_decoder,
    collate,
    decode_jpeg,
    decode_pending,
    mean_abs_diff,
    nvjpeg_finisher,
    reduction,
)
from util.run.errors import UserError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms


def jpeg(size, idx=0, quality=90, mode="RGB") -> EncodedImage:
    """One of scikit-learn's two photographs at ``size`` (w, h), as JPEG bytes."""
    from sklearn.datasets import load_sample_images

    img = Image.fromarray(load_sample_images().images[idx]).resize(size, Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return EncodedImage(buf.getvalue(), f"photo{idx}-{size[0]}x{size[1]}.jpg")


def reference(enc: EncodedImage, size: int, seed: int):
    """The reference pipeline on the decoded image, and its draws (box, flip) replayed from the same seed."""
    full = Image.open(io.BytesIO(enc.data)).convert("RGB")
    torch.manual_seed(seed)
    box = transforms.RandomResizedCrop.get_params(full, (0.2, 1.0), (3 / 4, 4 / 3))
    flip = bool(torch.rand(1) < 0.5)
    torch.manual_seed(seed)
    return pretrain_transform(size, "pil")(full), tuple(box), flip


def test_reduction_is_the_largest_that_keeps_the_output_size():
    assert reduction((447, 1000), (224, 224)) == 1
    assert reduction((448, 448), (224, 224)) == 2
    assert reduction((900, 1000), (224, 224)) == 4
    assert reduction((1792, 5000), (224, 224)) == 8
    assert reduction((5000, 5000), (16, 16)) == 8  # libjpeg scales by 1/8 at most


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_reduced_decode_equals_pils_draft(scale):
    enc = jpeg((1280, 960))
    img = Image.open(io.BytesIO(enc.data))
    img.draft("RGB", (1280 // scale, 960 // scale))
    expected = np.asarray(img.convert("RGB"))
    got = decode_jpeg(enc.data, scale, (1280, 960))
    assert got.shape == (-(-960 // scale), -(-1280 // scale), 3)
    assert np.array_equal(got, expected)


# (image size, output size, crops decoded at full size, crops decoded reduced) over 2 photos x 12 seeds
@pytest.mark.parametrize("size,out,n_full,n_reduced", [((500, 375), 224, 24, 0), ((1280, 960), 224, 2, 22),
                                                      ((500, 375), 112, 2, 22), ((2000, 1500), 112, 0, 24)])
def test_same_boxes_and_pixels_within_tolerance(size, out, n_full, n_reduced):
    """Same seed -> the fast path draws the reference's box and flip; its crop is within the measured
    tolerance (a box off by a few pixels differs by tens of grey levels); the generator ends in the same state;
    each crop takes the decode (full size or reduced) that its box allows."""
    fast = pretrain_transform(out, "auto")
    diffs = {1: [], 2: []}
    for idx in (0, 1):
        enc = jpeg(size, idx)
        for seed in range(12):
            ref, box, flip = reference(enc, out, seed)
            after_ref = torch.get_rng_state()
            torch.manual_seed(seed)
            assert fast.draw(size) == (box, flip)
            torch.manual_seed(seed)
            got = fast(enc)
            assert torch.equal(torch.get_rng_state(), after_ref)
            assert got.shape == ref.shape == (3, out, out) and got.dtype == torch.float32
            s = reduction(box[2:], (out, out))
            diffs[min(s, 2)].append(mean_abs_diff(ref, got, IMAGENET_STD)[0])
    assert sum(fast.stats.values()) == 24
    assert (len(diffs[1]), len(diffs[2])) == (n_full, n_reduced)
    assert sum(v for k, v in fast.stats.items() if k != "fast/1") == n_reduced
    assert max(diffs[1], default=0.0) <= EXACT_MEAN_TOLERANCE and sum(diffs[1]) < 0.1 * max(n_full, 1)
    assert max(diffs[2], default=0.0) <= REDUCED_MEAN_TOLERANCE and sum(diffs[2]) < 1.5 * max(n_reduced, 1)


def test_a_different_box_would_be_caught():
    """The tolerance is tight enough to tell a crop shifted by a few pixels from the right one."""
    enc = jpeg((500, 375))
    ref, (i, j, h, w), flip = reference(enc, 224, 0)
    full = Image.open(io.BytesIO(enc.data)).convert("RGB")
    shifted = transforms.functional.resized_crop(full, i + 4, j + 4, h, w, [224, 224],
                                                 transforms.InterpolationMode.BICUBIC)
    shifted = transforms.functional.hflip(shifted) if flip else shifted
    x = transforms.Normalize((0.485, 0.456, 0.406), IMAGENET_STD)(transforms.functional.to_tensor(shifted))
    assert mean_abs_diff(ref, x, IMAGENET_STD)[0] > 4 * EXACT_MEAN_TOLERANCE


def test_only_jpegs_take_the_fast_path_and_pngs_stay_bit_identical(digits_root):
    """PNG bytes: the reference path, bit-identical to today's transform on the PIL image; a JPEG whose
    crops can never be halved: the fast path, never a reduced decode."""
    fast = pretrain_transform(16, "auto")
    ref = pretrain_transform(16, "pil")
    files = sorted((digits_root / "train" / "3").iterdir())[:10]
    for k, f in enumerate(files):
        torch.manual_seed(k)
        a = ref(Image.open(f).convert("RGB"))
        torch.manual_seed(k)
        b = fast(EncodedImage(f.read_bytes(), str(f)))
        assert torch.equal(a, b)
    assert dict(fast.stats) == {"reference": 10}
    small = pretrain_transform(224, "auto")
    enc = jpeg((300, 400))  # the largest crop (300 x 400) is less than 2 x 224 on one side
    for seed in range(10):
        torch.manual_seed(seed)
        small(enc)
    assert dict(small.stats) == {"fast/1": 10}


def test_default_folder_pipeline_unchanged_on_digits(digits_root):
    """The scripts' default (decode='auto', the loader handing bytes) gives today's tensors on the digits."""
    new = image_folder(digits_root / "train", pretrain_transform(16), "training")
    old = image_folder(digits_root / "train", pretrain_transform(16, "pil"), "training")
    assert isinstance(new.transform, DecodeTransform) and not isinstance(old.transform, DecodeTransform)
    for i in (0, 100, 700):
        torch.manual_seed(i)
        a, la = old[i]
        torch.manual_seed(i)
        b, lb = new[i]
        assert torch.equal(a, b) and la == lb


def test_greyscale_jpeg_and_cmyk():
    fast = pretrain_transform(112, "auto")
    grey = jpeg((1000, 800), mode="L")
    ref, _, _ = reference(grey, 112, 3)
    torch.manual_seed(3)
    assert mean_abs_diff(ref, fast(grey), IMAGENET_STD)[0] <= REDUCED_MEAN_TOLERANCE
    cmyk = jpeg((300, 200), mode="CMYK")
    ref, _, _ = reference(cmyk, 112, 4)
    torch.manual_seed(4)
    assert torch.equal(fast(cmyk), ref)  # PIL's own CMYK conversion: the reference path
    assert fast.stats["reference"] == 1


def test_finetune_transform_keeps_its_draws():
    """timm's fine-tuning transform (RandAugment, random erasing) after the fast crop: same draws
    (python's random), output within tolerance of the reference."""
    from util.data.datasets import AugConfig
    from util.run.seed import seed_everything

    aug = AugConfig(crop_scale=(0.08, 1.0), hflip=0.5, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    ref = finetune_transform(112, aug)
    fast = with_decode(finetune_transform(112, aug), "auto")
    enc = jpeg((1280, 960))
    full = Image.open(io.BytesIO(enc.data)).convert("RGB")
    diffs = []
    for seed in range(8):
        seed_everything(seed)
        a = ref(full)
        seed_everything(seed)
        b = fast(enc)
        diffs.append(mean_abs_diff(a, b, IMAGENET_STD)[0])
    assert sum(fast.stats.values()) == 8
    assert np.median(diffs) <= REDUCED_MEAN_TOLERANCE


def test_nvjpeg_stage_runs_on_the_cpu_too():
    """The GPU path's batch stage (batch_jpeg_decoder) run on the CPU: same boxes and flips,
    pixels within tolerance. On CUDA only the device differs (not tested here: no GPU)."""
    tf = pretrain_transform(112, "nvjpeg")
    encs = [jpeg((500, 375), 0), jpeg((640, 480), 1)]
    items, refs = [], []
    for k, enc in enumerate(encs):
        ref, box, flip = reference(enc, 112, k)
        torch.manual_seed(k)
        item = tf(enc)
        assert isinstance(item, PendingJPEG) and item.box == box and item.flip == flip
        items.append((item, k))
        refs.append(ref)
    images, labels = collate(items)
    assert isinstance(images, list) and labels.tolist() == [0, 1]
    out = tf.finish_batch(images, torch.device("cpu"))
    assert out.shape == (2, 3, 112, 112)
    for k in range(2):
        assert mean_abs_diff(refs[k], out[k], IMAGENET_STD)[0] <= REDUCED_MEAN_TOLERANCE
    # a batch mixing a CPU-decoded tensor (a PNG) with pending JPEGs keeps its order
    mixed = decode_pending([refs[0], images[1]], (112, 112), transforms.InterpolationMode.BICUBIC,
                           tf.tail[1], tf.tail[2], torch.device("cpu"))
    assert torch.equal(mixed[0], refs[0]) and torch.allclose(mixed[1], out[1])


def test_the_batch_decoders_agree_and_torchcodec_is_the_default():
    """TorchCodec's decode_jpeg (the default where it imports) and torchvision's (the fallback, deprecated
    since torchvision 0.29) give the same pixels; only the fallback warns."""
    pytest.importorskip("torchcodec.decoders")
    data = [torch.frombuffer(bytearray(jpeg(size, k).data), dtype=torch.uint8)
            for k, size in enumerate([(500, 375), (64, 48)])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TorchCodec's path warns about nothing
        default = batch_jpeg_decoder()(data, torch.device("cpu"))
        codec = batch_jpeg_decoder("torchcodec")(data, torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vision = batch_jpeg_decoder("torchvision")(data, torch.device("cpu"))
    if tuple(int(x) for x in torchvision.__version__.split(".")[:2]) >= (0, 29):
        assert any(issubclass(w.category, DeprecationWarning) and "TorchCodec" in str(w.message) for w in caught)
    for d, c, v, size in zip(default, codec, vision, [(500, 375), (64, 48)]):
        assert d.dtype == torch.uint8 and d.shape == (3, size[1], size[0])
        assert torch.equal(d, c) and torch.equal(c, v)
    with pytest.raises(ValueError, match="Unknown JPEG decoder 'pil': one of torchcodec, torchvision"):
        batch_jpeg_decoder("pil")
    assert JPEG_DECODERS == ("torchcodec", "torchvision")


def test_nvjpeg_needs_cuda_and_the_pretraining_transform():
    with pytest.raises(UserError, match="CUDA"):
        nvjpeg_finisher(pretrain_transform(16, "nvjpeg"), torch.device("cpu"))
    assert nvjpeg_finisher(pretrain_transform(16, "auto"), torch.device("cpu")) is None
    from util.data.datasets import AugConfig

    with pytest.raises(UserError, match="nvjpeg"):
        with_decode(finetune_transform(16, AugConfig(aa="none", reprob=0.0)), "nvjpeg")
    with pytest.raises(UserError, match="Unknown decoder"):
        pretrain_transform(16, "turbo")


def test_unreadable_bytes_name_the_file():
    fast = pretrain_transform(16, "auto")
    with pytest.raises(UserError, match="broken.jpg"):
        fast(EncodedImage(b"\xff\xd8\xff\xe0" + b"\x00" * 50, "broken.jpg"))
    with pytest.raises(UserError, match="broken.png"):
        fast(EncodedImage(b"\x89PNG garbage", "broken.png"))
