"""Every run folder's config.json records what a reproduction needs (util/run/provenance.py)."""
import json
import socket
import subprocess

from util.run import provenance

import torch
from conftest import NO_MONITORS, ROOT, run_pretrain

TINY = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--input_size", "16", "--device", "cpu",
        "--batch_size", "16", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "1", "--log_every", "100",
        *NO_MONITORS]


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_config_json_holds_the_code_stack_hardware_command_and_numerics(small_folder, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    argv = ["main_pretrain.py", *TINY, "--data_path", str(small_folder), "--output_dir", str(tmp_path / "run")]
    monkeypatch.setattr("sys.argv", argv)
    run_pretrain(*argv[1:])
    p = json.loads((tmp_path / "run" / "config.json").read_text())["provenance"]
    assert p["git"]["commit"] == git("rev-parse", "HEAD", cwd=ROOT).strip()
    assert p["git"]["dirty"] == bool(git("status", "--porcelain", cwd=ROOT).strip())
    assert torch.__version__.startswith(p["versions"]["torch"]) and p["versions"]["timm"]
    assert p["versions"]["python"].count(".") == 2 and "open_clip_torch" in p["versions"]
    assert p["world_size"] == 1 and p["hosts"] == [socket.gethostname()]
    assert p["hardware"]["cpu_count"] >= 1
    assert p["command"].endswith("main_pretrain.py " + " ".join(argv[1:]))
    env = p["environment"]
    assert env["NCCL_DEBUG"] == "WARN" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and env["OMP_NUM_THREADS"] == "1"
    assert env["torch_float32_matmul_precision"] in ("highest", "high", "medium") and "torch_tf32_matmul" in env
    err = capfd.readouterr().err
    block = err[err.index("run provenance:"):]
    assert f"code: {p['git']['commit'][:12]}" in block and "stack: python " in block
    assert "1 process(es) on 1 host(s)" in block and "NCCL_DEBUG=WARN" in block


def test_git_state_tells_a_clean_tree_from_each_change_and_a_folder_without_git(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=repo)
    clean = provenance.git_state(repo)
    assert clean == {"commit": git("rev-parse", "HEAD", cwd=repo).strip(), "dirty": False, "diff_sha256": None}
    (repo / "a.py").write_text("x = 2\n")
    edited = provenance.git_state(repo)
    assert edited["dirty"] and edited["commit"] == clean["commit"] and len(edited["diff_sha256"]) == 16
    (repo / "a.py").write_text("x = 3\n")
    assert provenance.git_state(repo)["diff_sha256"] != edited["diff_sha256"]  # another change, another hash
    (repo / "a.py").write_text("x = 1\n")
    (repo / "new.py").write_text("")  # an untracked file counts too
    assert provenance.git_state(repo)["dirty"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert provenance.git_state(plain) == {"commit": None}
    assert provenance.summary({**provenance.collect(torch.device("cpu"), 1, ["h"]), "git": {"commit": None}}).startswith(
        "code: not a git checkout")
