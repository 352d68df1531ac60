"""Shared fixtures: a private data cache, small image folders, a tiny random CLIP on disk, and a
helper that runs the real scripts in real processes, a local HTTP server and download cache."""
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CUDA_SKIP = "needs a CUDA GPU: tools/gpu_check.sh runs these on one (tools/GPU_CHECK.md)"


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers): one torch thread per worker and in every
    process a test starts, so that two workers share two cores without busy-waiting threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA device. The tests
    of the demo's end-to-end run (marked ``demo``, minutes) come first, so that one worker starts on
    them while the others take the rest."""
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(pytest.mark.skip(reason=CUDA_SKIP))

    items.sort(key=lambda item: item.get_closest_marker("demo") is None)  # stable: the order is otherwise kept


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Every test (and every process it starts) writes the built-in digits to a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["DEEPMIM_CACHE"] = str(cache)
    return cache


@pytest.fixture
def one_torch_thread():
    """torch on one thread in this process, like the processes the tests start (OMP_NUM_THREADS=1):
    busy-waiting threads of several processes on a shared 2-core machine slow everything down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_root(data_cache):
    from util.datasets import resolve_data_path

    return resolve_data_path("digits")


@pytest.fixture(scope="session")
def small_folder(digits_root, tmp_path_factory):
    """An ImageFolder with 8 train / 4 val images per class, copied from the built-in digits."""
    root = tmp_path_factory.mktemp("small")
    for split, n in (("train", 8), ("val", 4)):
        for cls_dir in sorted((digits_root / split).iterdir()):
            dest = root / split / cls_dir.name
            dest.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(f, dest / f.name)
    return root


def make_tiny_clip(seed: int = 0):
    """A random OpenAI-architecture CLIP (ViT image tower, 32 px, patch 4, width 64, output 32)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    return CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, patch_size=4, image_size=32),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=64, heads=1, layers=1),
        quick_gelu=True,
    ).eval()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """The tiny CLIP written as OpenAI distributes CLIP (TorchScript archive) and as a state dict."""
    root = tmp_path_factory.mktemp("clip")
    model = make_tiny_clip()
    torch.save(model.state_dict(), root / "clip_state_dict.pt")
    imgs, text = torch.ones(2, 3, 32, 32), torch.zeros(2, 8, dtype=torch.long)
    traced = torch.jit.trace_module(model, dict(forward=(imgs, text), encode_image=(imgs,)))
    torch.jit.save(traced, str(root / "clip_torchscript.pt"))
    return {"model": model, "state_dict": root / "clip_state_dict.pt", "torchscript": root / "clip_torchscript.pt"}


def run_script(script: str, *args: str, timeout: int = 600, check: bool = True, env=None) -> subprocess.CompletedProcess:
    """Run ``python <script> args...`` from the repo root in a fresh process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture()
def server(tmp_path):
    """An HTTP server in a thread serving ``tmp_path / 'www'``; records the paths requested."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.root, httpd.requests, httpd.base = root, requests, f"http://127.0.0.1:{httpd.server_port}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPMIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "checkpoints"
