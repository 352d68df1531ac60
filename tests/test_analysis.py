"""The analysis tools: layer probes, attention distance / diversity, reconstruction figures."""
import json
import math

from util.checkpoints import convert
from util.run.errors import UserError

import numpy as np
import pytest
import torch
from PIL import Image

import models_deepmim
import models_vit
from evaluation import probes
from targets.pixel import patchify
from tools import attention_analysis, probe_layers, visualize

TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=4, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)


def tiny_pretrain_checkpoint(path, seed: int, norm_pix: bool = True, **cfg):
    """A pre-training checkpoint of this repo (random weights) of a 4-block DeepMIM, layers 2 and 4 supervised."""
    torch.manual_seed(seed)
    model = models_deepmim.DeepMIM(models_deepmim.DeepMIMConfig(**{**TINY, "ds_layers": (2, 4), **cfg}))
    torch.save({"model": model.state_dict(), "epoch": 0, "model_cfg": model.cfg.to_dict(),
                "args": {"norm_pix_loss": norm_pix, "mask_ratio": 0.75}}, path)
    return model


@pytest.fixture()
def two_checkpoints(tmp_path):
    """Two different encoders in two layouts: ours (pre-training) and a bare timm / encoder state dict."""
    tiny_pretrain_checkpoint(tmp_path / "ours.pth", seed=0)
    torch.manual_seed(1)
    other = models_deepmim.DeepMIM(models_deepmim.DeepMIMConfig(**TINY, ds_layers=(4,)))
    torch.save(convert.encoder_only(other.state_dict()), tmp_path / "encoder.pth")
    return [str(tmp_path / "ours.pth"), str(tmp_path / "encoder.pth")]


def run(module, *args):
    return module.main(module.get_args_parser().parse_args([str(a) for a in args]))


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# --------------------------------------------------------------------------------------------
# layer probes


def test_probe_separates_linearly_separable_features_from_xor():
    rng = np.random.RandomState(0)

    def blobs(n):
        """Four clusters at (+-1, +-1) with a little noise; two labelings of the same points."""
        corners = rng.choice([-1.0, 1.0], size=(n, 2))
        x = corners + 0.15 * rng.randn(n, 2)
        return x, (corners[:, 0] > 0).astype(int), ((corners[:, 0] > 0) ^ (corners[:, 1] > 0)).astype(int)

    tx, t_sep, t_xor = blobs(400)
    vx, v_sep, v_xor = blobs(400)
    assert probes.probe_accuracy(tx, t_sep, vx, v_sep) == 100.0  # a line separates the classes
    assert probes.probe_accuracy(tx, t_xor, vx, v_xor) < 65.0  # XOR: no line does better than ~50 %


def test_probe_tool_on_two_checkpoints_of_different_layouts(two_checkpoints, small_folder, tmp_path):
    results = run(probe_layers, *two_checkpoints, "--names", "ours", "enc", "--data_path", small_folder,
                  "--output_dir", tmp_path / "probe", "--max_iter", 200, "--train_per_class", 0, 3)
    saved = json.loads((tmp_path / "probe" / "probe_layers.json").read_text())
    assert saved["results"] == results and set(results) == {"ours", "enc"}
    for per_key in results.values():
        assert set(per_key) == {"token", "avg", "token_3shot", "avg_3shot"}
        assert all(len(accs) == 4 and all(0.0 <= a <= 100.0 for a in accs) for accs in per_key.values())
    assert results["ours"] != results["enc"]  # two different encoders, probed separately
    assert max(max(a) for a in results["ours"].values()) > 20.0  # learns something (chance is 10 %)
    assert png_size(tmp_path / "probe" / "probe_layers.png")[0] > 0


def test_few_per_class_takes_k_of_every_class():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 4)
    idx = probes.few_per_class(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 2, 3]  # class 1 has only 2
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert probes.few_per_class(labels, 3, seed=0).tolist() == idx.tolist()  # seeded


def test_one_pass_features_equal_the_per_layer_features(two_checkpoints, small_folder):
    model = models_vit.from_checkpoint(two_checkpoints[0])
    assert model.blocks[0].attn.num_heads == 3  # from the checkpoint's model_cfg (weights do not tell)
    assert models_vit.from_checkpoint(two_checkpoints[1]).blocks[0].attn.num_heads == 1  # 48 // 64, at least 1
    from util.data.datasets import classification_datasets, eval_transform

    _, val, _ = classification_datasets(str(small_folder), None, eval_transform(16), need_train=False)
    feats, labels = probe_layers.extract_features(model, val, 16, ["token", "avg"], torch.device("cpu"))
    assert feats["token"].shape == (4, len(val), 48) and labels.tolist() == val.targets
    x = torch.stack([val[i][0] for i in range(3)])
    with torch.no_grad():
        for layer in (1, 4):
            for pool in ("token", "avg"):
                expected = model.layer_features(x, layer, pool).numpy()
                np.testing.assert_allclose(feats[pool][layer - 1][:3], expected, atol=1e-5)


def test_linprobe_recipe_prints_the_main_linprobe_command_of_every_layer(two_checkpoints, capsys):
    run(probe_layers, *two_checkpoints, "--names", "a", "b", "--recipe", "linprobe", "--data_path", "/imagenet")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8
    assert [int(line.split("--probe_layer ")[1].split()[0]) for line in lines] == [1, 2, 3, 4] * 2
    assert all("main_linprobe.py" in line and "--data_path /imagenet" in line for line in lines)


def test_probe_tool_refuses_mismatched_names(two_checkpoints, tmp_path):
    with pytest.raises(UserError, match="--names gives 1 labels for 2 checkpoints"):
        run(probe_layers, *two_checkpoints, "--names", "a", "--output_dir", tmp_path)


# --------------------------------------------------------------------------------------------
# attention distance and diversity


def with_cls(patch_attn: torch.Tensor, cls_mass: float = 0.0) -> torch.Tensor:
    """[H, L, L] attention over patches -> [1, H, 1 + L, 1 + L] with ``cls_mass`` on the cls key."""
    h, n, _ = patch_attn.shape
    full = torch.zeros(1, h, n + 1, n + 1, dtype=torch.float64)
    full[0, :, 1:, 1:] = (1 - cls_mass) * patch_attn
    full[0, :, 1:, 0] = cls_mass
    full[0, :, 0, :] = 1.0 / (n + 1)
    return full


def test_mean_attention_distance_by_hand():
    p = 4  # pixels per patch
    # 2x2 grid: self -> 0; uniform -> (0 + p + p + p*sqrt(2)) / 4; horizontal neighbour -> p
    eye = torch.eye(4, dtype=torch.float64)
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    neighbour = eye[[1, 0, 3, 2]]  # patches 0<->1 and 2<->3 are side by side
    dist = attention_analysis.mean_attention_distance(with_cls(torch.stack([eye, uniform, neighbour]), 0.3), (2, 2), p)
    assert dist.tolist() == pytest.approx([0.0, p * (2 + math.sqrt(2)) / 4, p])  # the cls mass is renormalised away
    # 1x3 grid, uniform: pair distances 0 (x3), 1 (x4), 2 (x2) grid steps -> 8/9 of a patch on average
    dist = attention_analysis.mean_attention_distance(with_cls(torch.full((1, 3, 3), 1 / 3, dtype=torch.float64)), (1, 3), p)
    assert dist.item() == pytest.approx(p * 8 / 9)


def test_attention_diversity_by_hand():
    rows = torch.softmax(torch.randn(5, 5, dtype=torch.float64), dim=-1)
    same = with_cls(torch.stack([rows, rows, rows]))
    assert attention_analysis.attention_diversity(same) == pytest.approx(0.0, abs=1e-12)
    eye = torch.eye(4, dtype=torch.float64)
    disjoint = with_cls(torch.stack([eye, eye[[1, 0, 3, 2]]]))  # every query: two heads on different keys
    assert attention_analysis.attention_diversity(disjoint) == pytest.approx(1.0)
    # three heads A, A, B with A and B disjoint: pairs (A,A) = 0, (A,B) = (A,B) = 1 -> 2/3
    assert attention_analysis.attention_diversity(with_cls(torch.stack([eye, eye, eye[[1, 0, 3, 2]]]))) == pytest.approx(2 / 3)
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); JS = (KL(p|m) + KL(q|m)) / 2 in bits
    js = attention_analysis.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item()
    assert js == pytest.approx(0.5 * (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5 * math.log2(2)))
    assert 0 < attention_analysis.attention_diversity(with_cls(torch.stack([rows, rows.roll(1, dims=1)]))) < 1


def test_recorded_attention_is_what_the_block_computes():
    torch.manual_seed(0)
    model = models_vit.create_model("vit_tiny_patch4", num_classes=0, img_size=16, depth=2).eval()
    outputs = []
    model.blocks[1].attn.register_forward_hook(lambda m, i, o: outputs.append((i[0], o)))
    recorder = attention_analysis.AttentionRecorder(model)
    with torch.no_grad():
        model.forward_features(torch.randn(2, 3, 16, 16))
        x, out = outputs[0]
        attn = model.blocks[1].attn
        a = recorder.maps[1]  # [2, 3 heads, 17, 17]
        v = attn.qkv(x).reshape(2, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)[2]
        expected = attn.proj((a @ v).transpose(1, 2).reshape(2, 17, 192))
    assert a.shape == (2, 3, 17, 17) and torch.allclose(a.sum(-1), torch.ones(2, 3, 17))
    assert torch.allclose(out, expected, atol=1e-5)  # the fused SDPA output, rebuilt from the recorded weights
    recorder.close()


def test_attention_tool_on_two_checkpoints(two_checkpoints, small_folder, tmp_path):
    results = run(attention_analysis, *two_checkpoints, "--names", "ours", "enc", "--data_path", small_folder,
                  "--num_images", 12, "--batch_size", 5, "--num_heads", 3, "--output_dir", tmp_path)
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["results"] == results
    max_dist = 4 * math.sqrt(18)  # corner to corner of the 4x4 grid of 4-pixel patches
    for layers in results.values():
        assert [e["layer"] for e in layers] == [1, 2, 3, 4]
        for e in layers:
            assert len(e["distance"]) == 3 and all(0 < d < max_dist for d in e["distance"])
            assert e["mean_distance"] == pytest.approx(sum(e["distance"]) / 3)
            assert 0 <= e["diversity"] <= 1 and all(0 < c < 1 for c in e["cls_attention"])
    assert results["ours"] != results["enc"]
    assert png_size(tmp_path / "attention.png")[0] > 0


# --------------------------------------------------------------------------------------------
# reconstruction figures


def figure_px(columns: int, rows: int):
    """engine_monitor.draw's size at 100 dpi: 1.5 in per column + 0.8 in (colour bar), 1.6 in per row + 0.4 in."""
    return round(100 * (1.5 * columns + 0.8)), round(100 * (1.6 * rows + 0.4))


def test_visualization_has_one_panel_per_supervised_layer_plus_the_inputs(tmp_path, small_folder):
    tiny_pretrain_checkpoint(tmp_path / "ckpt.pth", seed=0, ds_layers=(1, 2, 4))
    out = run(visualize, tmp_path / "ckpt.pth", "--data_path", small_folder, "--num_images", 3, "--out",
              tmp_path / "rec.png", "--device", "cpu")
    assert png_size(out) == figure_px(2 + 3, 3)  # image, masked, 3 layers; 3 rows

    model, args = visualize.load_pretrained(str(tmp_path / "ckpt.pth"))
    targets, names = visualize.rebuild_targets(model, args, "ckpt.pth")
    assert names == ["pixel"] * 3 and targets["pixel"].norm_pix  # the checkpoint's --norm_pix_loss
    imgs = visualize.pick_images(str(small_folder), 16, 3)
    rec = visualize.reconstruct(model, targets, names, imgs, 0.75, seed=0)
    fig = visualize.draw(imgs, rec, [1, 2, 4], (4, 4))
    axes = fig.axes
    assert len(axes) == 3 * 5 and all(len(ax.images) == 1 for ax in axes)
    assert [ax.get_title().split(" loss")[0] for ax in axes[:5]] == ["image", "masked", "L1", "L2", "L4"]
    keep = rec["mask"] == 0  # [N, L]
    assert keep.sum(1).tolist() == [4, 4, 4]  # 25 % of 16 patches visible
    patches = patchify(imgs, 4)
    for panel in rec["panels"]:  # visible patches pasted back exactly; masked ones predicted
        recon = panel["recon"]
        assert torch.equal(patchify(recon, 4)[keep], patches[keep])
        assert not torch.allclose(patchify(recon, 4)[~keep], patches[~keep])
    assert torch.all(patchify(rec["masked"], 4)[~keep] == 0)


def test_visualization_of_a_clip_checkpoint_draws_pca_colours_and_cosine_maps(tmp_path, small_folder, tiny_clip):
    ckpt = tmp_path / "clip.pth"
    tiny_pretrain_checkpoint(ckpt, seed=0, img_size=32, pred_dims=(32, 32), losses=("cosine", "cosine"))
    with pytest.raises(UserError, match="pass --clip_path"):
        run(visualize, ckpt, "--data_path", small_folder, "--out", tmp_path / "x.png")
    out = run(visualize, ckpt, "--data_path", small_folder, "--num_images", 2, "--clip_path", tiny_clip["state_dict"],
              "--out", tmp_path / "cos.png", "--device", "cpu")
    assert png_size(out) == figure_px(2 + 1 + 2 * 2, 2)  # image, masked, CLIP target; per layer PCA and cosine

    model, args = visualize.load_pretrained(str(ckpt))
    targets, names = visualize.rebuild_targets(model, args, str(ckpt), {"clip_path": str(tiny_clip["state_dict"])})
    assert names == ["clip", "clip"]
    imgs = visualize.pick_images(str(small_folder), 32, 2)
    rec = visualize.reconstruct(model, targets, names, imgs, 0.75, seed=0)
    cos = rec["panels"][0]["cosine"]
    assert cos.shape == (2, 64) and torch.all(cos.abs() <= 1 + 1e-6)
    # the layer's training loss is 2 - 2 cos, averaged over the masked patches
    m = rec["mask"]
    assert torch.allclose(rec["losses"][0], ((2 - 2 * cos) * m).sum(1) / m.sum(1), atol=1e-5)
    assert rec["target_pca"]["clip"].shape == (2, 64, 3) and rec["panels"][1]["pca"].shape == (2, 64, 3)
    fig = visualize.draw(imgs, rec, [2, 4], (8, 8))
    assert len(fig.axes) == 2 * 7 + 1  # and the colour bar of the cosine maps
    assert fig.axes[-1].get_ylabel() == "cos(prediction, target)"


def test_visualize_refuses_a_checkpoint_without_model_cfg(two_checkpoints):
    with pytest.raises(UserError, match="not a pre-training checkpoint of this repo"):
        visualize.load_pretrained(two_checkpoints[1])


# --------------------------------------------------------------------------------------------
# the study's bookkeeping (tools/run_experiments.py): numbers read back from the files the scripts write


def test_study_statistics_and_tables_from_constructed_run_files(tmp_path):
    from tools import run_experiments as study

    seeds = [0, 1]
    probes, attention = {}, {}
    for seed in seeds:
        for k, config in enumerate(("init", "mae", "deepmim")):
            name = f"{config}_seed{seed}"
            probes[name] = {"avg": [50.0 + 10 * k + seed, 60.0], "avg_10shot": [30.0, 40.0 + 2 * seed]}
            attention[name] = [{"layer": 1, "mean_distance": 8.0 + seed, "diversity": 0.1 * k},
                               {"layer": 2, "mean_distance": 6.0, "diversity": 0.0}]
            if config != "init":
                run = study.run_dir(tmp_path, config, seed)
                (run / "pretrain").mkdir(parents=True)
                (run / "finetune").mkdir()
                (run / "pretrain" / "log.txt").write_text("".join(
                    json.dumps({"train_loss_L12": 1.0 - 0.1 * e - 0.01 * k, "epoch": e}) + "\n" for e in range(3)))
                accs = [70.0, 90.0 + 2 * seed, 80.0 + 4 * seed]  # best 90 / 92, last 80 / 84
                (run / "finetune" / "log.txt").write_text("".join(
                    json.dumps({"test_acc1": acc, "epoch": e}) + "\n" for e, acc in enumerate(accs)))
        (tmp_path / "analysis" / f"probe_seed{seed}").mkdir(parents=True)
        (tmp_path / "analysis" / f"probe_seed{seed}" / "probe_layers.json").write_text(
            json.dumps({"results": {n: v for n, v in probes.items() if n.endswith(f"seed{seed}")}}))
    (tmp_path / "analysis" / "attention").mkdir()
    (tmp_path / "analysis" / "attention" / "attention.json").write_text(json.dumps({"results": attention}))

    res = study.collect(tmp_path, seeds)
    mae = res["mae"]["stats"]
    assert mae["ft_final"]["values"] == [80.0, 84.0] and mae["ft_final"]["mean"] == 82.0
    assert mae["ft_final"]["std"] == pytest.approx(math.sqrt(8.0))  # sample std of (80, 84): sqrt(2^2 + 2^2)
    assert mae["ft_best"]["values"] == [90.0, 92.0]
    assert [s["mean"] for s in mae["loss_L12"]] == pytest.approx([0.99, 0.89, 0.79])
    assert mae["probe"]["avg"][0]["mean"] == 60.5 and mae["probe"]["avg_10shot"][1]["mean"] == 41.0
    assert res["deepmim"]["stats"]["probe"]["avg"][0]["mean"] == 70.5
    assert res["init"]["stats"]["distance"][0]["mean"] == 8.5 and "ft_final" not in res["init"]["stats"]

    meta = {"seeds": seeds, "epochs": 3, "ft_epochs": 3, "wall_time": "0:00:01", "cpus": 2, "jobs": 2, "cpu_seconds": 2.0,
            "idle_machine_estimate": "0:00:01"}
    md = study.tables(res, meta)
    # DeepMIM's last-epoch accuracies equal MAE's here: (80, 84) -> Δ 0, standard error sqrt(8/2 + 8/2) = 2.83
    assert "| last epoch | 82.0 ± 2.8 | 82.0 ± 2.8 | +0.0 ± 2.8 |" in md
    assert "| 1 | 50.5 ± 0.7 | 60.5 ± 0.7 | 70.5 ± 0.7 | +10.0 ± 0.7 |" in md  # avg probe, layer 1
    assert "10 training images per class" in md


# --------------------------------------------------------------------------------------------
# the tools' progress, partial results, model-matching commands and image sample (issue 13)


def test_probe_tool_writes_as_it_goes_and_a_rerun_skips_what_is_done(two_checkpoints, small_folder, tmp_path):
    out, broken = tmp_path / "probe", tmp_path / "broken.pth"
    torch.save({"model": {"not_an_encoder.weight": torch.zeros(2)}}, broken)
    common = ["--names", "ours", "enc", "--data_path", small_folder, "--output_dir", out, "--max_iter", 100]
    with pytest.raises(UserError, match="not a ours / reference / mae / encoder checkpoint"):
        run(probe_layers, two_checkpoints[0], broken, *common)
    saved = json.loads((out / "probe_layers.json").read_text())  # the first checkpoint's probes survived the failure
    assert saved["complete"] is False and set(saved["results"]) == {"ours"}
    first = saved["results"]["ours"]
    assert {k: len(v) for k, v in first.items()} == {"token": 4, "avg": 4}

    # a rerun keeps what is there (a marked value stays) and probes only what is missing (cut layers come back)
    (out / "probe_layers.json").write_text(json.dumps({**saved, "results": {"ours": {
        "token": [-1.0, *first["token"][1:]], "avg": first["avg"][:2]}}}))
    results = run(probe_layers, *two_checkpoints, *common)
    assert results["ours"]["token"] == [-1.0, *first["token"][1:]]
    assert results["ours"]["avg"] == first["avg"]
    assert set(results) == {"ours", "enc"} and len(results["enc"]["avg"]) == 4
    final = json.loads((out / "probe_layers.json").read_text())
    assert final["complete"] is True and final["results"] == results

    results = run(probe_layers, *two_checkpoints, *common[:-1], 150)  # other settings: everything again
    assert results["ours"]["token"][0] != -1.0


def test_linprobe_recipe_commands_build_the_model_each_checkpoint_holds(tmp_path, capsys):
    import main_linprobe
    from tools.common import tool_device

    pretrain = models_deepmim.create_model("deepmim_vit_tiny_patch4", img_size=16, decoder_depth=1, ds_layers=[12])
    torch.save({"model": pretrain.state_dict(), "model_cfg": pretrain.cfg.to_dict(), "epoch": 0,
                "args": {"model": "deepmim_vit_tiny_patch4", "input_size": 16}}, tmp_path / "pretrain.pth")
    finetuned = models_vit.create_model("vit_small_patch16", img_size=64, num_classes=10, depth=2)
    torch.save({"model": finetuned.state_dict(), "args": {"model": "vit_small_patch16", "input_size": 64,
                                                          "global_pool": True}}, tmp_path / "finetuned.pth")
    run(probe_layers, tmp_path / "pretrain.pth", tmp_path / "finetuned.pth", "--names", "ti", "s", "--recipe",
        "linprobe", "--data_path", "/imagenet")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12 + 2 and not any("vit_base_patch16" in line for line in lines)
    for line, (model, size, pool) in zip(lines, [("vit_tiny_patch4", 16, "--cls_token")] * 12
                                         + [("vit_small_patch16", 64, "--global_pool")] * 2):
        assert f"--model {model} --input_size {size} {pool}" in line
        flags = main_linprobe.get_args_parser().parse_args(line.split("main_linprobe.py ")[1].split())
        assert (flags.model, flags.input_size, flags.global_pool) == (model, size, pool == "--global_pool")
    # the analysis tools run on the GPU when there is one
    for tool in (probe_layers, attention_analysis):
        assert tool.get_args_parser().parse_args(["x.pth"]).device == ""
    assert tool_device("").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_attention_images_are_a_seeded_class_balanced_sample(small_folder):
    few = [0, 0, 0, 1, 1, 2]  # round robin: one of each class, then class 0 again (the others ran out)
    assert np.bincount(np.take(few, attention_analysis.balanced_sample(few, 4, seed=0))).tolist() == [2, 1, 1]
    from util.data.datasets import classification_datasets, eval_transform

    _, val, _ = classification_datasets(str(small_folder), None, eval_transform(16), need_train=False)
    labels = np.asarray(val.targets)  # 4 images of each of 10 classes, class by class
    picks = attention_analysis.balanced_sample(labels, 20, seed=0)
    assert np.bincount(labels[picks], minlength=10).tolist() == [2] * 10  # the first 20 would be classes 0..4 only
    assert picks == attention_analysis.balanced_sample(labels, 20, seed=0)
    assert picks != attention_analysis.balanced_sample(labels, 20, seed=1)
    assert np.bincount(labels[attention_analysis.balanced_sample(labels, 13, seed=0)]).tolist() == [2, 2, 2] + [1] * 7
    assert len(attention_analysis.balanced_sample(labels, 1000)) == 40
    imgs = attention_analysis.load_images(str(small_folder), 16, 20, seed=0)
    assert torch.equal(imgs, torch.stack([val[i][0] for i in picks]))


def test_progress_off_a_terminal_prints_plain_lines(capsys, tmp_path):
    from tools import make_shards
    from tools import run_experiments as study
    from tools.common import progress

    for _ in progress(range(50), desc="slow loop", unit="img"):  # the default interval: the first and the last line
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("slow loop:   0% 0/50") and lines[-1].startswith("slow loop: 100% 50/50")
    assert len(lines) <= 3 and not any("\r" in line for line in lines)

    log = make_shards.ShardProgress()  # write_shards' messages, every tenth of the shards, drive a bar with an ETA
    for k in (1, 2, 3, 4):
        log(f"train: {k}/4 shards, {10 * k} images")
    log("something else")
    err, out = capsys.readouterr()[::-1]
    assert "train shards:  50% 2/4" in err and err.strip().splitlines()[-1].startswith("train shards: 100% 4/4")
    assert "40 images" in err and out == "something else\n"

    # the study reruns a probe whose file is still partial (probe_layers.json is written as it goes)
    path = tmp_path / "probe_layers.json"
    assert not study.finished(path) and not study.finished(None)
    path.write_text(json.dumps({"results": {}, "complete": False}))
    assert not study.finished(path)
    path.write_text(json.dumps({"results": {}, "complete": True}))
    assert study.finished(path)
