"""The fast path: fused attention, torch.compile, gradient checkpointing, no per-step host sync, benchmark."""
import json

import pytest
import torch
from conftest import tiny_deepmim

from targets.clip import CLIPTeacher, load_clip_visual
from targets.pixel import PixelTarget


def tiny():
    return tiny_deepmim(depth=2, ds_layers=(1, 2))


def op_names(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_student_and_teacher_attention_take_the_fused_path(tiny_clip):
    model = tiny()
    imgs = torch.randn(2, 3, 16, 16)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    ops = op_names(lambda: model(imgs, PixelTarget(16, 4)(imgs)))
    assert any("scaled_dot_product" in o for o in ops) and "aten::softmax" not in ops

    teacher = CLIPTeacher(load_clip_visual(str(tiny_clip["state_dict"])))
    x = torch.randn(2, 3, 32, 32)
    for ctx in (torch.inference_mode, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        def run(ctx=ctx):
            with ctx(), torch.inference_mode():
                teacher(x)
        ops = op_names(run)
        fused = [o for o in ops if "scaled_dot_product" in o or "_native_multi_head_attention" in o]
        assert fused and "aten::softmax" not in ops, sorted(ops)


@pytest.mark.slow  # compiling takes minutes on CPU; the eager fused-attention tests above are its sibling
def test_compiled_and_eager_losses_and_gradients_are_equal(compile_here):
    model = tiny()
    imgs = torch.randn(4, 3, 16, 16)
    target, noise = PixelTarget(16, 4, norm_pix=True)(imgs), torch.rand(4, 16)
    eager = model(imgs, target, noise=noise)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model)(imgs, target, noise=noise)
    compiled.loss.backward()
    assert torch.allclose(compiled.layer_losses, eager.layer_losses, atol=1e-5)
    assert all(torch.allclose(p.grad, grads[n], atol=1e-5) for n, p in model.named_parameters())


def test_gradient_checkpointing_changes_nothing_but_memory():
    model = tiny().train()
    imgs = torch.randn(4, 3, 16, 16)
    target, noise = PixelTarget(16, 4)(imgs), torch.rand(4, 16)
    model(imgs, target, noise=noise).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(imgs, target, noise=noise).loss.backward()
    assert all(torch.allclose(p.grad, grads[n], atol=1e-6) for n, p in model.named_parameters())


def test_training_loop_reads_the_device_only_at_log_steps(small_folder, tmp_path, monkeypatch):
    """Host syncs (.item() / .tolist()) do not grow with the number of iterations between log steps."""
    import main_pretrain

    calls = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=original, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(batch_size: int) -> int:
        calls.clear()
        main_pretrain.main(main_pretrain.get_args_parser().parse_args([
            "--data_path", str(small_folder), "--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1",
            "--batch_size", str(batch_size), "--epochs", "1", "--num_workers", "0", "--device", "cpu",
            "--log_every", "1000", "--output_dir", str(tmp_path / str(batch_size)), "--input_size", "16"]))
        return len(calls)

    assert syncs(16) == syncs(4)  # 5 iterations and 20 iterations: the same reads, all at the end


def test_benchmark_tool_reports_and_compares(tmp_path):
    from tools import benchmark

    out = tmp_path / "bench.json"
    bargs, rest = benchmark.parse_cli(["--steps", "2", "--compare", "", "--ds_layers 12", "--rounds", "2", "--warmup",
                                       "1", "--json", str(out), "--", "--model", "deepmim_vit_tiny_patch4",
                                       "--input_size", "16", "--batch_size", "4", "--device", "cpu",
                                       "--decoder_depth", "1"])
    results = benchmark.main(bargs, rest)
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["results"]] == ["", "--ds_layers 12"]
    for r in results:
        assert set(r["sections_ms"]) == {"data", "teacher", "encoder", "decoders", "backward", "optimizer"}
        assert r["images_per_s"] > 0 and r["steps_timed"] == 2
    # four decoders cost more FLOPs than one
    assert results[0]["gflops_per_image"] > results[1]["gflops_per_image"] > 0


def test_benchmark_compare_takes_settings_that_look_like_flags():
    from tools import benchmark

    bargs, rest = benchmark.parse_cli(["--compare", "", "--compile", "--no-fused_adamw", "--amp bf16", "--steps", "3",
                                       "--", "--model", "m", "--compile"])
    assert bargs.compare == ["", "--compile", "--no-fused_adamw", "--amp bf16"] and bargs.steps == 3
    assert rest == ["--model", "m", "--compile"]
    with pytest.raises(SystemExit, match="at least one setting"):
        benchmark.parse_cli(["--compare", "--steps", "3"])


@pytest.mark.parametrize("mode_args", [["--mode", "finetune"]])
def test_benchmark_finetune_mode(mode_args):
    from tools import benchmark

    bargs = benchmark.get_args_parser().parse_args([*mode_args, "--steps", "1", "--rounds", "1", "--warmup", "1"])
    (r,) = benchmark.main(bargs, ["--model", "vit_tiny_patch4", "--input_size", "16", "--batch_size", "4",
                                  "--device", "cpu"])
    assert set(r["sections_ms"]) == {"data", "forward", "backward", "optimizer"} and r["gflops_per_image"] > 0


def test_benchmark_detection_mode():
    from tools import benchmark

    bargs = benchmark.get_args_parser().parse_args(["--mode", "detect", "--steps", "2", "--rounds", "1", "--warmup", "1"])
    (r,) = benchmark.main(bargs, ["--model", "vitdet_mask_rcnn_vit_tiny_patch4", "--batch_size", "2", "--device", "cpu",
                                  "--amp", "none"])
    assert set(r["sections_ms"]) == {"data", "forward", "backward", "optimizer"}
    assert r["gflops_per_image"] > 0 and r["batch_size"] == 2 and r["steps_timed"] == 2
    target = benchmark.detection_target(64, seed=0)
    assert target["masks"].shape == (8, 64, 64) and bool((target["boxes"][:, 2:] <= 64).all())


def _segmentor():
    from Segmentation.models import SegConfig, Segmentor

    cfg = SegConfig(model="vit_tiny_patch4", img_size=32, num_classes=5, out_indices=(1, 2, 3, 4), channels=16,
                    aux_channels=8, drop_path=0.0)
    imgs, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    return Segmentor(cfg).train(), lambda m: sum(torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(o, size=(32, 32), mode="bilinear"), labels) for o in m(imgs))


def _detector():
    from Detection.models import create_model
    from Detection.train import detection_loss

    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:50] = 1
    batch = ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([1]),
                                       "masks": masks}])
    return create_model("vitdet_mask_rcnn_vit_tiny_patch4", num_classes=3).train(), lambda m: detection_loss(m, batch)[0]


@pytest.mark.parametrize("build", [_segmentor, _detector], ids=["segmentation", "detection"])
def test_grad_checkpointing_of_the_downstream_models_changes_nothing_but_memory(build):
    """--grad_checkpointing of Segmentation/train.py and Detection/train.py (the trainer's wrap turns it on)."""
    from util.run.trainer import wrap

    torch.manual_seed(0)
    model, loss_of = build()
    grads = []
    for on in (False, True):
        model.set_grad_checkpointing(False)
        wrapped = wrap(model, torch.device("cpu"), distributed=False, grad_checkpointing=on)
        vit = getattr(model.backbone, "net", model.backbone)
        assert vit.grad_checkpointing is on
        torch.manual_seed(1)  # the detector's box sampling draws the same subsets
        loss_of(wrapped).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=1e-5), n
