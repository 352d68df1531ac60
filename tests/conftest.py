"""Shared fixtures and helpers: a private data cache and private library caches, small image folders,
a tiny random CLIP on disk, the real scripts in real processes (in-process where the contract is not
about processes), ports for launches that need one, a local HTTP server and download cache, and the
check that a run leaves nothing in the system temp directory."""
import functools
import http.server
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CUDA_SKIP = "needs a CUDA GPU: tools/gpu_check.sh runs these on one (tools/GPU_CHECK.md)"


# where libraries write unless told otherwise (home-folder caches, the system temp directory): every
# process of the run is pointed into the run's own folder instead
LIBRARY_DIRS = ("MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "TORCH_HOME",
                "HF_HOME", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")


# what the run's folders hold at most at once (`make test-all` on 2 workers: 2.2 GB, sampled every 3 s; a
# passing test's folder is removed when it ends, pyproject's tmp_path_retention_policy), with room to spare
MIN_FREE_BYTES = 4 * 2**30


@pytest.hookimpl(trylast=True)  # after pytest's own: tmp_path's factory exists
def pytest_configure(config):
    """One torch thread in the test processes and in every process a test starts: the tensors are tiny,
    pytest-xdist runs one worker per core, and busy-waiting OpenMP threads of several processes on a
    2-core machine slow everything down. It also makes the numbers of an in-process run equal to those
    of a started process (a float sum's rounding follows the thread count).

    The controller (or the only process) gives the run a temp directory of its own: ``TMPDIR``,
    inherited by the xdist workers and by every process they start, points into a fresh folder, and
    :func:`pytest_sessionfinish` fails the run if anything is left in it. The system temp directory
    itself is shared with every other process of the machine, so comparing it would blame this run for
    their files; pytest's ``tmp_path`` folders are made first, where they always are."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if hasattr(config, "workerinput"):
        return
    libs = config._tmp_path_factory.mktemp("library_dirs")  # tmp_path's root, in the system temp directory as usual
    free = shutil.disk_usage(libs).free
    if free < MIN_FREE_BYTES:  # a full disk mid-run fails tests by the hundred, none of them saying why
        raise pytest.UsageError(
            f"{free / 2**30:.1f} GiB free where the tests write ({libs.parent}); the tests ask for "
            f"{MIN_FREE_BYTES / 2**30:.0f} GiB (the full tier writes up to 2.2 GB at once). Free some space there, "
            "or point the tests elsewhere with --basetemp DIR (or TMPDIR).")
    for name in LIBRARY_DIRS:  # before any test module imports a library
        os.environ[name] = str(libs / name.lower())
    config._run_temp = tempfile.mkdtemp(prefix="deepmim-tests-")
    os.environ["TMPDIR"] = config._run_temp
    tempfile.tempdir = None  # tempfile reads TMPDIR again


def pytest_sessionfinish(session, exitstatus):
    """The run, all its workers and every process they started, left nothing in the run's temp directory."""
    run_temp = getattr(session.config, "_run_temp", None)
    if run_temp is None:
        return
    left = sorted(os.listdir(run_temp))
    shutil.rmtree(run_temp, ignore_errors=True)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"FAILED: the tests left {len(left)} entries in the temp directory: {left[:10]}",
                            red=True)
        session.exitstatus = 1


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
    """Every test (and every process it starts) writes the built-in digits to a private cache (the
    libraries' caches, matplotlib, torch.compile, W&B, ..., are the run's: :func:`pytest_configure`)."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["DEEPMIM_CACHE"] = str(cache)
    # the processes the tests start (and kill): their temp files (multiprocessing's pymp-*, torchrun's
    # logs) in a folder of this run; a test that needs its own passes TMPDIR itself (clean_env(tmp_path))
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    return cache


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test on one torch thread (pytest_configure), also after a test that changed it."""
    torch.set_num_threads(1)


@pytest.fixture
def compile_here():
    """For a test that calls ``torch.compile`` in the test process: inductor keeps its precompiled C++
    headers under ``tempfile.gettempdir()/torchinductor_<user>`` whatever ``TORCHINDUCTOR_CACHE_DIR``
    says (the path is fixed when ``torch._inductor.codecache`` is imported), so the run's temp directory
    would keep them; the test compiles without them (the kernels are the same, each compiles its own
    includes)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(cpp_cache_precompile_headers=False):
        yield


@pytest.fixture(scope="session")
def digits_root(data_cache):
    from util.data.datasets import resolve_data_path

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


@pytest.fixture(scope="session")
def small_coco(tmp_path_factory):
    """The synthetic COCO-layout set (Detection/make_synthetic.py), small: 6 training, 12 validation images."""
    from Detection.make_synthetic import build

    return build(tmp_path_factory.mktemp("coco") / "coco", sizes={"train": 6, "val": 12})


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


def run_pretrain(*args) -> Dict:
    """``main_pretrain.py ARGS`` in this process (no imports to repeat)."""
    import main_pretrain

    return main_pretrain.main(main_pretrain.get_args_parser().parse_args([*map(str, args)]))


def run_finetune(*args) -> Dict:
    """``main_finetune.py ARGS`` in this process."""
    import main_finetune

    return main_finetune.main(main_finetune.get_args_parser().parse_args([*map(str, args)]))


def read_log(out: Path) -> List[Dict]:
    """The JSON lines of ``out/log.txt``."""
    return [json.loads(x) for x in (Path(out) / "log.txt").read_text().splitlines() if x.strip()]


def weights(path: Path) -> Dict[str, torch.Tensor]:
    """The ``model`` state dict of a checkpoint file."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """Same keys, every tensor equal to ``atol`` (absolute)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].float(), b[k].float()
        assert torch.allclose(x, y, atol=atol, rtol=0), (k, (x - y).abs().max().item())


# the k-NN and reconstruction monitors' defaults (on for a folder with val/) add seconds of feature
# extraction to every epoch; tests whose contract is not the monitors turn them off (tests/test_monitor.py
# covers them, including that they do not change what training computes)
NO_MONITORS = ("--knn_every", "0", "--recon_every", "0")
# the detection job at its smallest (tests/test_detection.py, tests/test_trainer.py): ViT-Ti/4 cut to 4
# blocks at 64 px, 8 iterations of 2 images, evaluated at 4 and 8; --data_path: the small_coco fixture
TINY_DET = ("--model", "vitdet_mask_rcnn_vit_tiny_patch4", "--device", "cpu", "--amp", "none", "--batch_size", "2",
            "--num_workers", "0", "--iters", "8", "--warmup_iters", "2", "--lr", "1e-3", "--layer_decay", "1.0",
            "--log_every", "2", "--eval_every", "4", "--save_every", "100", "--save_last_every", "100",
            "--stop_check_every", "1")


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def clean_env(tmp: Path = None, **extra: str) -> Dict[str, str]:
    """This environment without any launcher's variables (the test may itself run under one), one torch
    thread, unbuffered output, plus ``extra``. With ``tmp`` (the test's tmp_path): ``TMPDIR`` in a folder
    of it, for launchers that write there (torchrun's ``torchelastic_*`` log folders, never removed)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    if tmp is not None:
        (Path(tmp) / "tmp").mkdir(exist_ok=True)
        extra = {"TMPDIR": str(Path(tmp) / "tmp"), **extra}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


# Ports for launches that take one (MASTER_PORT, --master_port); torchrun --standalone picks its own.
# Asking the kernel for a free port and then handing it to a process that binds it later is a race:
# the kernel may give the same ephemeral port to anyone in between. These ports come from below the
# ephemeral range (the kernel never hands those out by itself), from a block of 500 of each pytest-xdist
# worker's own (two concurrent tests never share a worker's counter), at a random offset per run (two
# concurrent runs of the suite; at most 400, so a run keeps 100 ports inside its block), and each is
# checked to be bindable before it is handed out.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_PORTS = itertools.count(20000 + (_WORKER % 24) * 500 + random.Random().randrange(0, 400, 20))


def free_port() -> int:
    """A port that no other test of any concurrent run of this suite is handed, bindable right now."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


TINY_DEEPMIM = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=16,
                   decoder_depth=1, decoder_num_heads=2)


def tiny_deepmim(**overrides):
    """A seeded DeepMIM of 4 blocks of width 32 at 16 px (patch 4), decoders of one block; ``overrides``
    change any field of its config (e.g. ``depth=2, ds_layers=(1, 2)``)."""
    import models_deepmim

    torch.manual_seed(0)
    return models_deepmim.DeepMIM(models_deepmim.DeepMIMConfig(**{**TINY_DEEPMIM, **overrides}))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random pre-training checkpoint of the demo's model (``deepmim_vit_tiny_patch4`` at 16 px, decoder
    depth 1): what the resume, probe and kill tests start from (they test mechanics, not what
    pre-training learnt)."""
    import models_deepmim

    path = tmp_path_factory.mktemp("tiny_pretrain") / "checkpoint-0.pth"
    torch.manual_seed(0)
    cfg = models_deepmim.model_config("deepmim_vit_tiny_patch4", img_size=16, decoder_depth=1)
    torch.save({"model": models_deepmim.DeepMIM(cfg).state_dict(), "epoch": 0, "args": {}, "model_cfg": cfg.to_dict()},
               path)
    return path


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
