"""Reading every weight file users have without running code from it (util.serialization)."""
import argparse
import os
import pickle
import warnings
import zipfile
from typing import Tuple

from util.checkpoints import serialization
from util.run.errors import UserError

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn


def load_jit_state_dict(path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; it is the reference here
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def assert_same_state_dict(ours, ref):
    assert list(ours) == list(ref)  # same keys, same order
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and ours[k].stride() == v.stride(), k
        assert torch.equal(ours[k], v), k


# --------------------------------------------------------------------------------------------
# pickles: what MAE / the reference DeepMIM save, and what must be refused


def mae_args(output_dir: str) -> argparse.Namespace:
    """A real Namespace as MAE's / the reference's main_pretrain.py + init_distributed_mode build it."""
    p = argparse.ArgumentParser("MAE pre-training", add_help=False)
    p.add_argument("--batch_size", default=64, type=int)
    p.add_argument("--model", default="mae_vit_large_patch16", type=str)
    p.add_argument("--clip_path", type=str)
    p.add_argument("--mask_ratio", default=0.75, type=float)
    p.add_argument("--norm_pix_loss", action="store_true")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--blr", type=float, default=1e-3)
    p.add_argument("--cutmix_minmax", type=float, nargs="+", default=None)
    p.add_argument("--output_dir", default="./output_dir")
    p.add_argument("--device", default="cuda")
    p.add_argument("--resume", default="")
    p.add_argument("--dist_url", default="env://")
    p.add_argument("--hybrid", default=False)
    args = p.parse_args(["--norm_pix_loss", "--output_dir", output_dir, "--cutmix_minmax", "0.2", "0.8",
                         "--clip_path", "/path/to/clip"])
    args.distributed, args.rank, args.gpu, args.dist_backend = False, 0, 0, "nccl"  # init_distributed_mode
    args.lr = args.blr * 4096 / 256
    return args


def mae_save_model(tmp_path, legacy: bool = False):
    """A checkpoint written exactly as MAE's / the reference's ``misc.save_model`` writes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu")  # NativeScalerWithGradNormCount.state_dict() is the GradScaler's
    loss = model(torch.randn(3, 4)).square().mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    args = mae_args(str(tmp_path))
    to_save = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1599,
               "scaler": scaler.state_dict(), "args": args}
    path = tmp_path / "checkpoint-1599.pth"
    torch.save(to_save, path, _use_new_zipfile_serialization=not legacy)  # legacy: what torch < 1.6 wrote
    return path, model, optimizer, scaler, args


@pytest.mark.parametrize("legacy", [False, True])
def test_checkpoint_written_like_mae_save_model_loads(tmp_path, legacy):
    path, model, optimizer, scaler, args = mae_save_model(tmp_path, legacy)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)  # what a plain weights-only load says: the allowance is needed

    ckpt = serialization.load_torch(str(path))
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args"} and ckpt["epoch"] == 1599
    assert isinstance(ckpt["args"], dict) and ckpt["args"] == vars(args)  # a plain dict, every value kept
    assert ckpt["args"]["cutmix_minmax"] == [0.2, 0.8] and ckpt["args"]["lr"] == pytest.approx(0.016)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    fresh.load_state_dict(ckpt["model"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, betas=(0.9, 0.95))
    opt.load_state_dict(ckpt["optimizer"])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert ckpt["scaler"] == scaler.state_dict() and ckpt["scaler"]["scale"] == 65536.0
    torch.amp.GradScaler("cpu").load_state_dict(ckpt["scaler"])
    if not legacy:  # mmap reads the same (zip format only; ignored for legacy files)
        assert serialization.load_torch(str(path), mmap=True)["args"] == vars(args)
    # the allowance is scoped to the call: the process-wide list is unchanged
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


class RunsCode:
    """Unpickling this calls os.system, as a malicious checkpoint would."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path, legacy):
    marker = tmp_path / "side_effect"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": RunsCode(str(marker))}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UserError) as err:
        serialization.load_torch(str(path))
    msg = str(err.value)
    assert "posix.system" in msg and "run code" in msg and "\x1b" not in msg and "two options" not in msg
    assert "re-save" in msg  # says what to do
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is malicious: an unsafe load runs it
    assert marker.exists()


def test_truncated_missing_and_foreign_files_give_one_clear_message(tmp_path):
    path, *_ = mae_save_model(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    for bad in (cut, text):
        with pytest.raises(UserError, match="is not a readable PyTorch checkpoint .*truncated") as err:
            serialization.load_torch(str(bad))
        assert "\x1b" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        serialization.load_torch(str(tmp_path / "missing.pth"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        serialization.load_torch(str(broken))


def test_safetensors_are_real_and_found_by_content(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"w": base, "tied": base, "view": base[:, 1], "i": torch.tensor([1, 2], dtype=torch.int64)}
    path = tmp_path / "weights.pth"  # a safetensors file under another name
    serialization.save_safetensors(tensors, path, extra={"epoch": 3, "args": {"lr": 0.1, "layers": [6, 8]}})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.read_bytes()[8:9] == b"{" and header_len < path.stat().st_size
    with safe_open(str(path), framework="pt") as f:  # the safetensors library reads it
        assert set(f.keys()) == set(tensors) and f.metadata()["format"] == "pt"
    assert serialization.is_safetensors(str(path)) and not serialization.is_torchscript(str(path))
    ckpt = serialization.load_torch(str(path))
    assert ckpt["epoch"] == 3 and ckpt["args"] == {"lr": 0.1, "layers": [6, 8]}
    assert all(torch.equal(ckpt["model"][k], v) for k, v in tensors.items())
    plain = tmp_path / "plain.safetensors"
    serialization.save_safetensors({"w": base}, plain)
    assert set(serialization.load_torch(str(plain))) == {"w"}  # no extra: the tensors themselves
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    misnamed = tmp_path / "old_export.safetensors"  # a torch zip, as the converter used to write
    torch.save({"w": base}, misnamed)
    assert not serialization.is_safetensors(str(misnamed)) and torch.equal(serialization.load_torch(str(misnamed))["w"], base)
    with pytest.raises(UserError, match="tensors only"):
        serialization.save_safetensors({"w": base, "epoch": 3}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------------------------
# TorchScript archives


class Leaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4, bias=False)  # a None parameter: not in the state dict
        self.register_buffer("steps", torch.arange(6.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)  # TorchScript keeps it
        self.plain = torch.ones(1)  # a tensor attribute, neither parameter nor buffer

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) + self.steps[:4] + self.scratch.sum() + self.plain


class Tree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.leaf = Leaf()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4)])
        self.shared = self.layers[0]  # one module under two names
        self.register_buffer("window", self.leaf.steps[2:5])  # a view sharing another buffer's storage
        self.low = nn.Parameter(torch.randn(2, 3).half())
        self.register_buffer("strided", torch.randn(4, 3).t())  # non-contiguous

    def forward(self, x: Tensor) -> Tensor:
        y = self.leaf(x)
        for layer in self.layers:
            y = layer(y)
        return y * self.scale + self.shared(y) + self.window.sum() + self.low.float().sum() + self.strided.sum()


def test_genuine_torchscript_archives_give_the_tensors_torch_jit_load_gives(tmp_path, tiny_clip):
    torch.manual_seed(0)
    tree = Tree().eval()
    tree(torch.randn(2, 3))
    scripted, traced = tmp_path / "scripted.pt", tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(tree).save(str(scripted))
        torch.jit.trace(tree, torch.randn(2, 3)).save(str(traced))
    for path in (scripted, traced, tiny_clip["torchscript"]):  # the last: an open_clip CLIP traced as OpenAI ships it
        assert serialization.is_torchscript(str(path))
        ours = serialization.load_torchscript_state_dict(str(path))
        assert_same_state_dict(ours, load_jit_state_dict(path))
        assert_same_state_dict(serialization.load_torch(str(path)), ours)  # the one reader dispatches to it
    ours = serialization.load_torchscript_state_dict(str(scripted))
    assert "leaf.scratch" in ours and "leaf.plain" not in ours and "leaf.proj.bias" not in ours
    assert ours["window"].untyped_storage().data_ptr() == ours["leaf.steps"].untyped_storage().data_ptr()
    repacked = tmp_path / "deflated.pt"  # records compressed (torch stores them): read through zipfile
    with zipfile.ZipFile(scripted) as src, zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert_same_state_dict(serialization.load_torchscript_state_dict(str(repacked)), load_jit_state_dict(scripted))
    clip = serialization.load_torchscript_state_dict(str(tiny_clip["torchscript"]))
    assert all(torch.equal(clip[k], v) for k, v in tiny_clip["model"].state_dict().items())
    assert not serialization.is_torchscript(str(tiny_clip["state_dict"]))


class WritesFile(nn.Module):
    """A module whose __setstate__ (run by torch.jit.load) creates a file: torch.from_file(shared=True)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.target = target

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[Tensor, str, bool]:
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[Tensor, str, bool]) -> None:
        made = torch.from_file(state[1], shared=True, size=2)  # creates the file as a side effect
        self.weight = state[0] + made * 0
        self.target = state[1]
        self.training = state[2]


class CarriesPayload(nn.Module):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.payload = WritesFile(target)

    def forward(self, x: Tensor) -> Tensor:
        return self.payload(self.proj(x))


def test_torchscript_setstate_never_runs(tmp_path):
    marker = tmp_path / "created_by_setstate"
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(CarriesPayload(str(marker))).save(str(path))
    assert not marker.exists()
    load_jit_state_dict(path)  # torch.jit.load runs the archive's __setstate__ ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match=r"module payload .*WritesFile.* own __setstate__ code.*refusing"):
        serialization.load_torchscript_state_dict(str(path))  # ... this reader never does
    with pytest.raises(UserError, match="__setstate__"):
        serialization.load_torch(str(path))
    assert not marker.exists()


def test_torchscript_archive_with_foreign_globals_is_refused(tmp_path):
    marker = tmp_path / "side_effect"
    genuine = tmp_path / "genuine.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Leaf()).save(str(genuine))
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(genuine) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():  # the same archive, its data.pkl swapped for one that runs os.system
            data = pickle.dumps(RunsCode(str(marker)), protocol=2) if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, data)
    assert serialization.is_torchscript(str(crafted))
    with pytest.raises(UserError, match=r"Refused .*GLOBAL posix.system is not allowed") as err:
        serialization.load_torchscript_state_dict(str(crafted))
    assert "\x1b" not in str(err.value)
    assert not marker.exists()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(genuine.read_bytes()[:-200])
    with pytest.raises(UserError, match="not a readable"):
        serialization.load_torch(str(cut))
