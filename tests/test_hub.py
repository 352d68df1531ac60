"""Weights by name, URL and Hugging Face hub id (util.hub), from a local server and a local hub cache."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from util.checkpoints import hub
from util.run.errors import UserError

import pytest
import torch


def weights_file(path: Path) -> str:
    torch.save({"model": {"w": torch.arange(1000.0)}, "epoch": 1}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_by_name_once_with_progress_then_offline(server, cache, capfd):
    digest = weights_file(server.root / "tiny_release.pth")
    hub.register(hub.Published("tiny_release", f"{server.base}/tiny_release.pth", "ours", "pretrain",
                               "deepmim_vit_tiny_patch4", sha256=digest))
    try:
        path = hub.resolve("tiny_release")
        assert Path(path) == cache / "tiny_release.pth"
        assert Path(path).read_bytes() == (server.root / "tiny_release.pth").read_bytes()
        assert "100%" in capfd.readouterr().err  # the progress bar
        assert hub.resolve("tiny_release") == path and server.requests == ["/tiny_release.pth"]  # cached
        server.shutdown()
        server.server_close()
        assert hub.resolve("tiny_release") == path  # offline: the server is gone
        assert sorted(p.name for p in cache.iterdir()) == [".tiny_release.pth.lock", "tiny_release.pth"]  # no partial files
    finally:
        hub.PUBLISHED.pop("tiny_release")


def test_checksum_mismatch_is_refused_and_not_kept(server, cache, monkeypatch):
    digest = weights_file(server.root / "model.pth")
    url = f"{server.base}/model.pth"
    with pytest.raises(UserError, match=f"has sha256 {digest}, but {'0' * 64} was expected; it was deleted"):
        hub.resolve(url, sha256="0" * 64)
    assert not any(p.suffix == ".pth" or ".part" in p.name for p in cache.iterdir())
    assert hub.resolve(url, sha256=digest[:12]) == str(cache / "model.pth")  # a prefix matches

    # a published name checks the publisher's md5 prefix: an internal mirror holding another file fails
    (server.root / "mae" / "pretrain").mkdir(parents=True)
    weights_file(server.root / "mae" / "pretrain" / "mae_pretrain_vit_base.pth")
    monkeypatch.setenv("DEEPMIM_MIRROR", server.base)
    with pytest.raises(UserError, match=r"has md5 [0-9a-f]{32}, but 8cad7c was expected"):
        hub.resolve("mae_pretrain_vit_base")
    assert server.requests[-1] == "/mae/pretrain/mae_pretrain_vit_base.pth"
    assert not (cache / "mae_pretrain_vit_base.pth").exists()

    # a corrupted cached file is caught too
    (cache / "model.pth").write_bytes(b"garbage")
    with pytest.raises(UserError, match="was expected; it was deleted"):
        hub.resolve(url, sha256=digest)
    assert hub.resolve(url, sha256=digest)  # downloaded again


def test_unknown_names_list_the_known_ones(tmp_path, server, cache):
    with pytest.raises(UserError) as err:
        hub.resolve("mae_pretrain_vit_bse")
    msg = str(err.value)
    assert all(name in msg for name in ("mae_pretrain_vit_base", "mae_finetuned_vit_huge", "hf-hub:", "timm:"))
    with pytest.raises(UserError, match="Google Drive folder only"):
        hub.resolve("deepmim_vit_base_clip")
    with pytest.raises(UserError, match="not found"):
        hub.resolve(str(tmp_path / "checkpoint-1599.pth"))
    local = tmp_path / "local.pth"
    weights_file(local)
    assert hub.resolve(str(local)) == str(local)  # a file is taken as is
    with pytest.raises(UserError, match="Could not download .*Offline"):
        hub.resolve(f"{server.base}/missing.pth")
    assert all(entry.url.startswith("https://dl.fbaipublicfiles.com/mae/") for entry in hub.PUBLISHED.values())


HUB_SCRIPT = """
import sys
from util.checkpoints import hub
from util.run.errors import UserError
for source in sys.argv[1:]:
    try:
        print("ok", hub.resolve(source))
    except UserError as e:
        print("error", e)
"""


def resolve_in_process(sources, hf_cache):
    """hub.resolve of each source, in one fresh process with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set
    (huggingface_hub reads them at import). Returns the output line of each."""
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, *sources], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(sources), proc.stdout
    return lines


def hub_cache_entry(hf_cache: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """A cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/file)."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hf_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(data)
    return snapshot / filename


def test_hf_hub_and_timm_names_come_from_the_offline_hub_cache(tmp_path):
    from safetensors.torch import save

    hf_cache = tmp_path / "hf"
    data = save({"w": torch.ones(3)})
    st = hub_cache_entry(hf_cache, "acme/tiny-vit", "model.safetensors", data)
    bin_only = hub_cache_entry(hf_cache, "acme/old-vit", "pytorch_model.bin", b"\x80\x02}q\x00.")
    mae = hub_cache_entry(hf_cache, "timm/vit_base_patch16_224.mae", "model.safetensors", data)
    found = resolve_in_process(["hf-hub:acme/tiny-vit", "hf-hub:acme/old-vit", "timm:vit_base_patch16_224.mae",
                                "hf-hub:acme/absent", "timm:vit_base_patch16_224.nosuch"], hf_cache)
    assert found[:3] == [f"ok {st}", f"ok {bin_only}", f"ok {mae}"]  # safetensors first, else the .bin
    assert found[3].startswith("error hf-hub:acme/absent: none of model.safetensors, pytorch_model.bin")
    assert "HF_HUB_OFFLINE is set" in found[3]
    assert "timm has no pretrained weights of that name" in found[4]
