"""The CUDA paths, on a GPU: ``pytest -m cuda`` (skipped without one; tools/gpu_check.sh runs them).

Each fast path is compared with its plain version on the same weights and batch: mixed precision
with fp32, compiled with eager, fused AdamW with foreach, gradient checkpointing with plain. The
frozen teacher runs under inference mode with a fused attention kernel; the pre-training,
fine-tuning and segmentation CLIs train on CUDA; host syncs do not grow with the number of steps.
The in-process steps use the model and optimizer APIs (forward, loss, backward, step); the CLI runs
cover the training loop.

The fp32 references run with TF32 off (:func:`ieee_fp32`): cuDNN convolutions use TF32 by default,
which would put a ~1e-3 error into the side that is meant to be exact.
"""
import contextlib
import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from util.run.amp import make_scaler
from util.run.optim import adamw, weight_decay_groups

import pytest
import torch
from conftest import ROOT, read_log, run_script

import models_deepmim
from targets.base import compute_targets
from targets.clip import CLIPTeacher, load_clip_visual
from targets.pixel import PixelTarget

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")

# Relative tolerances (loss per layer, gradients / update as one vector) of a mixed-precision step
# against the fp32 step: about 2.5 and 8 unit roundoffs of bf16 (2**-8), 2 and 10 of fp16 (2**-11);
# every matmul input is rounded once, so a step's error is a few roundoffs. CPU autocast on the same
# model and batch measured 1.1e-3 / 5.9e-3 (bf16) and 8e-5 / 7e-4 (fp16). What breaks a path (an op
# left in fp16 that overflows, a reduction in low precision, a missing unscale: 4096x) is far larger.
AMP_TOL = {torch.bfloat16: (1e-2, 3e-2), torch.float16: (1e-3, 5e-3)}
FP32_TOL = 1e-4  # fp32 against fp32 with another summation order (other kernels, fusion): ~1e-6 expected

FUSED_SDPA = ("flash_attention", "efficient_attention", "cudnn_attention")  # in aten op names
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode's message


# --------------------------------------------------------------------------------------------
# helpers


def tiny(device: torch.device = CUDA, **overrides) -> models_deepmim.DeepMIM:
    """DeepMIM ViT-Ti/4 at 32 px (12 blocks, layers 6/8/10/12, 2-block decoders), seeded: equal weights."""
    torch.manual_seed(0)
    return models_deepmim.create_model("deepmim_vit_tiny_patch4", **overrides).to(device)


def batch(n: int = 8, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [n, 3, 32, 32], masking noise [n, 64] and norm-pix targets [n, 64, 48], on the GPU."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, 32, 32, generator=g)
    noise = torch.rand(n, 64, generator=g)
    return imgs.to(CUDA), noise.to(CUDA), PixelTarget(32, 4, norm_pix=True)(imgs).to(CUDA)


def clip_teacher(tiny_clip, dtype: torch.dtype = torch.float32) -> CLIPTeacher:
    """The tiny CLIP tower (32 px, patch 4, width 64) as main_pretrain builds it: on the GPU, in ``dtype``."""
    return CLIPTeacher(load_clip_visual(str(tiny_clip["state_dict"]))).to(device=CUDA, dtype=dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().flatten().cpu() for p in model.parameters()])


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])


@contextlib.contextmanager
def ieee_fp32():
    """fp32 matmuls and convolutions without TF32, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def amp(dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """CUDA autocast in ``dtype`` (None: plain fp32)."""
    return torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def forward_backward(model: torch.nn.Module, imgs, noise, target, dtype: Optional[torch.dtype] = None):
    with amp(dtype):
        out = model(imgs, target, noise=noise)
    out.loss.backward()
    return out


def op_names(fn: Callable[[], object]) -> set:
    """The aten ops ``fn`` dispatches (recorded on the host, also for CUDA tensors and the backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


def assert_fused_attention(ops: set, backward: bool = False) -> None:
    fused = [o for o in ops if any(k in o for k in FUSED_SDPA)]
    assert fused, f"no fused SDPA kernel among {sorted(ops)}"
    if backward:
        assert any(o.endswith("_backward") for o in fused), fused
    unfused = [o for o in ops if "softmax" in o or "attention_math" in o]
    assert not unfused, f"attention fell back to the math path: {unfused}"


def count_syncs(fn: Callable[[], None]) -> int:
    """How often ``fn`` makes the host wait for the GPU (each sync warns under sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_WARNING in str(w.message) for w in caught)




def finite_numbers(entry: Dict, prefix: str) -> Dict[str, float]:
    values = {k: v for k, v in entry.items() if k.startswith(prefix) and isinstance(v, (int, float))}
    assert values and all(math.isfinite(v) for v in values.values()), entry
    return values


# --------------------------------------------------------------------------------------------
# numerics of one step


def test_fp32_step_on_cuda_equals_the_cpu_step():
    """cuBLAS, cuDNN (patch embedding) and the efficient-attention SDPA kernel compute what the CPU computes."""
    imgs, noise, target = batch()
    gpu_model, cpu_model = tiny(), tiny(torch.device("cpu"))
    with ieee_fp32():
        gpu = forward_backward(gpu_model, imgs, noise, target)
    cpu = forward_backward(cpu_model, imgs.cpu(), noise.cpu(), target.cpu())
    assert rel_err(gpu.layer_losses, cpu.layer_losses) < FP32_TOL
    assert rel_err(flat_grads(gpu_model), flat_grads(cpu_model)) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_step_matches_fp32(dtype):
    """Loss, gradients and the parameter update of one step under autocast (fp16: with GradScaler)
    against the fp32 step. The update is plain SGD's, -lr * grad, so that it carries the gradient
    error one to one; AdamW's first step is about -lr * sign(grad), which would turn the rounding of
    tiny gradients into full-size sign flips (AdamW is compared fused against foreach below)."""
    imgs, noise, target = batch()
    runs = {}
    for dt in (None, dtype):
        model = tiny()
        seen: List[torch.dtype] = []
        model.blocks[0].attn.qkv.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(out.dtype))
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, enabled=dt == torch.float16)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        before = flat_params(model)
        with ieee_fp32():
            with amp(dt):
                out = model(imgs, target, noise=noise)
            scaler.scale(out.loss).backward()
            scaler.step(opt)  # unscales the gradients in place, then steps
            scaler.update()
        runs[dt] = dict(losses=out.layer_losses.detach(), grads=flat_grads(model), update=flat_params(model) - before,
                        dtype=seen[0], scale=scaler.get_scale())
    ref, low = runs[None], runs[dtype]
    assert ref["dtype"] == torch.float32 and low["dtype"] == dtype  # autocast really ran the matmuls in `dtype`
    loss_tol, grad_tol = AMP_TOL[dtype]
    loss_err = ((low["losses"] - ref["losses"]).abs() / ref["losses"]).max().item()
    assert loss_err < loss_tol, (loss_err, low["losses"], ref["losses"])
    assert rel_err(low["grads"], ref["grads"]) < grad_tol
    assert rel_err(low["update"], ref["update"]) < grad_tol
    if dtype == torch.float16:
        assert low["scale"] == 2.0**12  # no inf / NaN: the step was taken, not skipped


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_student_equals_eager(dtype, compile_here):
    cfg = dict(depth=4, ds_layers=(2, 4), decoder_depth=1)  # a smaller graph compiles sooner
    imgs, noise, target = batch()
    eager_model, compiled_model = tiny(**cfg), tiny(**cfg)
    with ieee_fp32():
        eager = forward_backward(eager_model, imgs, noise, target, dtype)
        compiled = forward_backward(torch.compile(compiled_model), imgs, noise, target, dtype)
    assert compiled.loss.grad_fn.name() == "CompiledFunctionBackward"  # it ran the compiled graph, not eager
    loss_tol, grad_tol = (FP32_TOL, FP32_TOL) if dtype is None else AMP_TOL[dtype]
    assert rel_err(compiled.layer_losses, eager.layer_losses) < loss_tol
    assert rel_err(flat_grads(compiled_model), flat_grads(eager_model)) < grad_tol


def test_fused_adamw_equals_foreach_with_loss_scaling():
    """Three AdamW steps on the same gradients through GradScaler, as fp16 training runs them (the
    fused kernel unscales inside, foreach after a separate unscale); the second step's gradients hold
    an inf, which both must skip (and halve the scale)."""
    imgs, noise, target = batch()
    base = tiny()
    with ieee_fp32():
        forward_backward(base, imgs, noise, target)
    grads = [p.grad.clone() for p in base.parameters()]
    base.zero_grad(set_to_none=True)
    trained = {}
    for fused in (True, False):
        model = copy.deepcopy(base)
        opt = adamw(weight_decay_groups(model, 0.05), 1e-3, betas=(0.9, 0.95), device=CUDA, fused=fused)
        assert bool(opt.defaults["fused"]) is fused and bool(opt.defaults["foreach"]) is not fused
        scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
        for step in range(3):
            for p, g in zip(model.parameters(), scaler.scale(grads)):  # what backward of the scaled loss gives
                p.grad = g
            if step == 1:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        steps = {float(s["step"]) for s in opt.state.values()}
        assert steps == {2.0} and scaler.get_scale() == 512.0, (steps, scaler.get_scale())
        trained[fused] = model
    for (name, a), b in zip(trained[True].named_parameters(), trained[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert (flat_params(trained[True]) - flat_params(base)).abs().max() > 1e-4  # the steps did move the weights


def test_gradient_checkpointing_equals_plain_and_saves_memory():
    """With drop path on: the recomputation must replay the CUDA random numbers of the forward."""
    imgs, noise, target = batch(n=32)
    grads, peaks = {}, {}
    for key, ckpt, seed in (("plain", False, 123), ("ckpt", True, 123), ("other_seed", False, 124)):
        model = tiny(drop_path_rate=0.1).train()
        model.set_grad_checkpointing(ckpt)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        torch.manual_seed(seed)
        with ieee_fp32():
            forward_backward(model, imgs, noise, target)
        peaks[key] = torch.cuda.max_memory_allocated() - start
        grads[key] = flat_grads(model)
    assert rel_err(grads["other_seed"], grads["plain"]) > 1e-3  # drop path is in effect
    assert rel_err(grads["ckpt"], grads["plain"]) < 1e-6
    assert peaks["ckpt"] < 0.8 * peaks["plain"], peaks


# --------------------------------------------------------------------------------------------
# attention kernels and the frozen teacher


def test_student_attention_takes_a_fused_kernel_forward_and_backward():
    model = tiny()
    imgs, noise, target = batch()
    assert_fused_attention(op_names(lambda: forward_backward(model, imgs, noise, target, torch.bfloat16)),
                           backward=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_teacher_runs_in_inference_mode_with_fused_attention(tiny_clip, dtype):
    """Called through compute_targets, as the training step calls it."""
    teacher = clip_teacher(tiny_clip, dtype)
    assert not any(p.requires_grad for p in teacher.parameters())
    imgs = torch.randn(4, 3, 32, 32, device=CUDA, requires_grad=True)  # a graph would reach back to these
    low = None if dtype == torch.float32 else dtype
    with amp(low):
        ops = op_names(lambda: compute_targets({"clip": teacher}, imgs))
        out = compute_targets({"clip": teacher}, imgs)["clip"]
        with torch.inference_mode():
            raw = teacher(imgs)
    assert raw.is_inference() and raw.dtype == dtype
    assert out.grad_fn is None and not out.requires_grad and out.dtype == torch.float32
    assert tuple(out.shape) == (4, 64, 32) and torch.isfinite(out).all()
    assert_fused_attention(ops)


def test_compiled_teacher_equals_eager(tiny_clip, compile_here):
    teacher = clip_teacher(tiny_clip)
    imgs = torch.randn(4, 3, 32, 32, device=CUDA)
    with ieee_fp32():
        eager = compute_targets({"clip": teacher}, imgs)["clip"]
        compiled = compute_targets({"clip": torch.compile(teacher)}, imgs)["clip"]
    assert rel_err(compiled, eager) < FP32_TOL


# --------------------------------------------------------------------------------------------
# host syncs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_training_steps_do_not_wait_for_the_gpu(tiny_clip, dtype):
    """CLIP targets, forward, loss, backward and fused AdamW (through GradScaler for fp16): the host
    never waits, so 3 and 6 steps make the same number of syncs (none)."""
    teacher = clip_teacher(tiny_clip, dtype)
    model = tiny(pred_dims=(32,) * 4, losses=("cosine",) * 4)
    opt = adamw(weight_decay_groups(model, 0.05), 1e-4, betas=(0.9, 0.95), device=CUDA)
    scaler = make_scaler(CUDA, dtype)
    imgs = batch()[0]

    def steps(n: int) -> None:
        for _ in range(n):
            with amp(dtype):
                target = compute_targets({"clip": teacher}, imgs)["clip"]
                loss = model(imgs, target).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    steps(1)  # lazy state first (optimizer moments, library handles)
    syncs = count_syncs(lambda: steps(3)), count_syncs(lambda: steps(6))
    assert syncs == (0, 0), syncs


SYNC_COUNTING = (  # run a script with every host sync reported on stderr
    "import runpy, sys, warnings, torch\n"
    "warnings.simplefilter('always')\n"
    "torch.cuda.set_sync_debug_mode('warn')\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def pretrain_flags(data: Path, out: Path, batch_size: int, *extra) -> List[str]:
    """1 epoch of the 80 images of ``small_folder``: 80 / batch_size steps, logged at the end only."""
    return ["--data_path", str(data), "--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--device", "cuda",
            "--batch_size", str(batch_size), "--epochs", "1", "--warmup_epochs", "1", "--log_every", "1000",
            "--save_every", "1", "--output_dir", str(out), *map(str, extra)]


def test_the_training_loop_syncs_do_not_grow_with_the_steps(small_folder, tiny_clip, tmp_path):
    """main_pretrain on CUDA (bf16, CLIP target) for 2 and for 4 steps: the same number of host syncs
    (model upload, the end-of-epoch reads and checkpoint), none per step."""
    counts = {}
    for batch_size in (40, 20):
        out = tmp_path / str(batch_size)
        proc = subprocess.run([sys.executable, "-c", SYNC_COUNTING, str(ROOT / "main_pretrain.py"),
                               *pretrain_flags(small_folder, out, batch_size, "--clip_path", tiny_clip["state_dict"],
                                               "--amp", "bf16", "--num_workers", "0")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (out / "checkpoint-0.pth").is_file()
        counts[80 // batch_size] = proc.stderr.count(SYNC_WARNING)
    assert counts[2] == counts[4], counts


# --------------------------------------------------------------------------------------------
# the CLIs on CUDA


def test_pretrain_compiled_then_finetune_fp16_on_cuda(small_folder, tiny_clip, tmp_path):
    """Pre-training: bf16, --compile (student and teacher), CLIP target, 2 steps, loader workers with
    pinned memory; fine-tuning from its checkpoint: fp16 with GradScaler and fused AdamW, 2 steps, evaluation."""
    pre = tmp_path / "pretrain"
    run_script("main_pretrain.py", *pretrain_flags(small_folder, pre, 40, "--clip_path", tiny_clip["state_dict"],
                                                    "--amp", "bf16", "--compile", "--num_workers", "2"),
               timeout=240)
    (entry,) = read_log(pre)
    assert entry["epoch"] == 0
    assert set(finite_numbers(entry, "train_loss")) >= {"train_loss", "train_loss_L6", "train_loss_L12"}
    ckpt = torch.load(pre / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])  # saved from the plain module
    assert ckpt["args"]["compile"] is True and ckpt["model"]["decoders.6.pred.weight"].shape[0] == 32
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())

    ft = tmp_path / "finetune"
    run_script("main_finetune.py", "--data_path", small_folder, "--model", "vit_tiny_patch4", "--device", "cuda",
               "--amp", "fp16", "--finetune", pre / "checkpoint-last.pth", "--batch_size", 40, "--epochs", 1,
               "--warmup_epochs", 1, "--num_workers", 2, "--log_every", 1, "--output_dir", ft, timeout=120)
    (entry,) = read_log(ft)
    finite_numbers(entry, "train_loss")
    assert 0.0 <= entry["test_acc1"] <= 100.0
    assert (ft / "checkpoint-last.pth").is_file() and (ft / "checkpoint-0.pth").is_file()


def test_segmentation_trains_and_evaluates_on_cuda(tmp_path):
    from Segmentation.make_synthetic import build as build_synthetic

    data = build_synthetic(tmp_path / "synthetic", sizes={"training": 16, "validation": 4})
    out = tmp_path / "seg"
    run_script("Segmentation/train.py", "--data_path", data, "--model", "vit_tiny_patch4", "--out_indices", "1,2,3,4",
               "--channels", 16, "--aux_channels", 8, "--crop_size", 32, "--img_scale", 128, 32, "--stride", 21,
               "--device", "cuda", "--amp", "bf16", "--num_workers", 0, "--batch_size", 4, "--drop_path", 0,
               "--lr", "1e-3", "--layer_decay", "1.0", "--warmup_iters", 2, "--iters", 4, "--log_every", 2,
               "--eval_every", 4, "--save_every", 4, "--save_last_every", 2, "--output_dir", out, timeout=120)
    log = read_log(out)
    train = [e for e in log if e["mode"] == "train"]
    assert [e["iteration"] for e in train] == [2, 4]
    for e in train:
        finite_numbers(e, "loss")
    (val,) = [e for e in log if e["mode"] == "val"]
    assert val["images"] == 4 and 0.0 <= val["mIoU"] <= 100.0
    assert (out / "checkpoint-4.pth").is_file()


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_nvjpeg_batch_stage_on_cuda_matches_the_cpu(decoder):
    """``--decode nvjpeg``'s batch stage with each decoder: the same boxes decoded by nvJPEG on the GPU and by
    libjpeg-turbo on the CPU agree to within the reduced-decode tolerance (IDCT and chroma upsampling
    differ slightly); the batch comes back on the GPU, normalized, in order."""
    from util.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from util.data.decode import REDUCED_MEAN_TOLERANCE, PendingJPEG, decode_pending, mean_abs_diff

    from test_decode import jpeg
    from torchvision.transforms import InterpolationMode

    if decoder == "torchcodec":
        pytest.importorskip("torchcodec.decoders")
    items = [PendingJPEG(torch.frombuffer(bytearray(jpeg(size, k).data), dtype=torch.uint8), box, flip)
             for k, (size, box, flip) in enumerate([((500, 375), (10, 20, 300, 400), False),
                                                    ((640, 480), (0, 0, 480, 640), True)])]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's decoders, deprecated since 0.29
        cpu = decode_pending(items, (112, 112), InterpolationMode.BICUBIC, mean, std, torch.device("cpu"), decoder)
        gpu = decode_pending(items, (112, 112), InterpolationMode.BICUBIC, mean, std, CUDA, decoder)
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (2, 3, 112, 112)
    for k in range(2):
        assert mean_abs_diff(cpu[k], gpu[k].cpu(), IMAGENET_STD)[0] <= REDUCED_MEAN_TOLERANCE
