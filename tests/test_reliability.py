"""Reliability of a run's output folder: a disk that fills during a save, a checkpoint corrupted on
disk, two runs in one folder, a killed run's lock and partial files, the exit status under each
launcher, and 16-bit images.

Runs happen in this process where they can (fast: no imports to repeat), through ``run_cli`` when
the test is about the one ``error:`` line and the exit status; real processes where another
process is the point (a lock holder killed with -9, torchrun).
"""
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

from util.checkpoints import reader as ckpt_util
from util.checkpoints.files import temp_path, write_atomic
from util.config.typed import RunConfig
from util.data.datasets import _load_image
from util.run import lock as lock_util
from util.run.errors import UserError, run_cli
from util.run.runner import start_run

import numpy as np
import pytest
import torch
from conftest import NO_MONITORS, ROOT, clean_env
from PIL import Image
from test_distributed import PRETRAIN, first_sample_of, popen, replace_by_pipe

import main_pretrain
import models_deepmim

TINY = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--input_size", "16", "--device", "cpu",
        "--batch_size", "16", "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "100",
        "--save_every", "1", *NO_MONITORS]


def cli(*args) -> int:
    """``main_pretrain.py TINY args`` in this process, as the command line runs it: its exit status."""
    try:
        run_cli(main_pretrain.main, main_pretrain.get_args_parser().parse_args([*TINY, *map(str, args)]))
    except SystemExit as e:
        return int(e.code)
    return 0


def error_lines(err: str):
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def epochs_logged(out: Path):
    return [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()]


def temps(folder: Path):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def checkpoint_size() -> int:
    """Bytes of one checkpoint of the TINY model (weights and the two AdamW moments)."""
    cfg = models_deepmim.model_config("deepmim_vit_tiny_patch4", img_size=16, decoder_depth=1)
    return ckpt_util.estimated_size(models_deepmim.DeepMIM(cfg))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 3.5 checkpoints."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    size = int(3.5 * checkpoint_size())
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the file-size-limit test covers the same")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# --------------------------------------------------------------------------------------------
# a write that fails


def assert_failed_save(code, err, out):
    """Exit 2 with one error line naming the file and the free space; no partial file; epoch 0 intact."""
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"error: Cannot write {out / 'checkpoint-last.pth'}: ")
    assert "free on its file system); the partial file was removed" in line
    assert temps(out) == []
    for name in ("checkpoint-0.pth", "checkpoint-last.pth"):
        assert ckpt_util.verify(str(out / name))  # complete, every CRC intact
        assert torch.load(out / name, weights_only=True)["epoch"] == 0
    assert epochs_logged(out) == [0]
    return line


def test_a_disk_that_fills_during_a_save_stops_with_one_line_and_the_rerun_resumes(small_folder, small_tmpfs, capsys):
    disk = small_tmpfs
    other = disk / "other-data"  # a checkpoint's worth of someone else's files
    other.write_bytes(b"\0" * checkpoint_size())
    out = disk / "run"
    # epoch 0 writes checkpoint-last.pth and checkpoint-0.pth (3 of 3.5 checkpoints used); epoch 1's
    # checkpoint-last.pth does not fit beside them
    code = cli("--data_path", small_folder, "--output_dir", out, "--epochs", 2)
    line = assert_failed_save(code, capsys.readouterr().err, out)
    assert ": No space left on the device (" in line

    # the user frees space; meanwhile a run killed mid-save has left its partial file, filling the
    # disk again: start-up removes it before it checks the folder and the free space
    other.unlink()
    partial = temp_path(out / "checkpoint-last.pth", pid=dead_pid())
    with open(partial, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass
    assert shutil.disk_usage(disk).free < 2**20
    code = cli("--data_path", small_folder, "--output_dir", out, "--epochs", 2)
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"removed 1 partial checkpoint file(s) left by a killed run: {partial.name}" in err
    assert f"resumed from {out / 'checkpoint-last.pth'}: continuing at epoch 1" in err
    assert epochs_logged(out) == [0, 1]
    assert torch.load(out / "checkpoint-1.pth", weights_only=True)["epoch"] == 1
    assert temps(out) == []


def test_a_save_past_the_file_size_limit_stops_with_one_line_and_the_rerun_resumes(small_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--data_path", small_folder, "--output_dir", out, "--epochs", 1) == 0
    limit = checkpoint_size() // 2  # log.txt, config.json and the events fit, a checkpoint does not
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = cli("--data_path", small_folder, "--output_dir", out, "--epochs", 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    line = assert_failed_save(code, capsys.readouterr().err, out)
    assert ": File too large for the file system or the process's file-size limit (" in line

    assert cli("--data_path", small_folder, "--output_dir", out, "--epochs", 2) == 0
    assert f"resumed from {out / 'checkpoint-last.pth'}: continuing at epoch 1" in capsys.readouterr().err
    assert epochs_logged(out) == [0, 1]


def test_a_writer_that_fails_for_another_reason_keeps_its_traceback(tmp_path):
    target = tmp_path / "checkpoint-last.pth"

    def buggy(f):
        f.write(b"PK")
        raise RuntimeError("not a write error")

    with pytest.raises(RuntimeError, match="not a write error"):
        write_atomic(target, buggy)
    assert list(tmp_path.iterdir()) == []


def test_start_up_removes_only_dead_writers_partial_files(tmp_path):
    host = socket.gethostname()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        names = {
            "dead": temp_path(tmp_path / "checkpoint-last.pth", pid=dead_pid()).name,
            "alive": temp_path(tmp_path / "checkpoint-3.pth", pid=alive.pid).name,
            "old_format_dead": f".checkpoint-best.pth.tmp-{dead_pid()}",
            "other_host_old": temp_path(tmp_path / "checkpoint-4.pth", pid=1, host="gpu17").name,
            "other_host_fresh": temp_path(tmp_path / "checkpoint-5.pth", pid=1, host="gpu18").name,
            "not_a_checkpoint": temp_path(tmp_path / "log.txt", pid=dead_pid()).name,
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        old = time.time() - ckpt_util.STALE_AFTER_S - 60
        os.utime(tmp_path / names["other_host_old"], (old, old))
        removed, kept = ckpt_util.remove_stale_temps(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert sorted(removed) == sorted([names["dead"], names["old_format_dead"], names["other_host_old"]])
    assert kept == [f"{names['alive']} (its writer, PID {alive.pid}, is running)",
                    f"{names['other_host_fresh']} (written on host gpu18 0 s ago; removed once it is 10 minutes old)"]
    assert names["alive"].endswith(f".tmp-{host}-{alive.pid}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["alive"], names["other_host_fresh"], names["not_a_checkpoint"]])


# --------------------------------------------------------------------------------------------
# integrity


def flip_a_byte_in_a_tensor(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor record of a torch zip; the record's name."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        head = f.read(30)
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    return info.filename


def test_a_flipped_byte_is_found_skipped_by_auto_resume_and_refused_by_resume(small_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--data_path", small_folder, "--output_dir", out, "--epochs", 2) == 0
    last = out / "checkpoint-last.pth"
    record = flip_a_byte_in_a_tensor(last)
    torch.load(last, weights_only=True)  # torch itself reads it without a word
    corrupt = tmp_path / "corrupt.pth"
    shutil.copy(last, corrupt)
    with pytest.raises(ckpt_util.CorruptCheckpoint, match=f"Bad CRC-32 for file '{record}'"):
        ckpt_util.verify(str(last))
    capsys.readouterr()

    # auto-resume: checkpoint-last.pth and checkpoint-1.pth hold the same position; the corrupt
    # one is skipped, with its name and the reason, and the intact one used
    assert cli("--data_path", small_folder, "--output_dir", out, "--epochs", 3) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {last}: corrupt (Bad CRC-32 for file '{record}'); trying the next furthest" in err
    assert f"resumed from {out / 'checkpoint-1.pth'}: continuing at epoch 2" in err
    assert epochs_logged(out) == [0, 1, 2]

    # --resume: refused with one line, before anything is written
    other = tmp_path / "other"
    assert cli("--data_path", small_folder, "--output_dir", other, "--epochs", 3, "--resume", corrupt) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: Checkpoint {corrupt} is corrupt (Bad CRC-32 for file '{record}'): it changed "
                                f"after it was written (a disk, memory or copy error), so its weights cannot be "
                                f"trusted. Use another checkpoint, or copy it again."]
    assert not list(other.glob("*.pth")) and not (other / "log.txt").exists()


def test_find_resume_goes_by_the_position_inside_and_names_every_file_it_skips(tmp_path, caplog):
    caplog.set_level("WARNING", logger="util.checkpoint")
    state = {"model": {"w": torch.zeros(4)}, "optimizer": {}, "args": {}}
    ckpt_util.save_atomic({**state, "epoch": 2, "step_in_epoch": 0}, tmp_path / "checkpoint-2.pth")
    ckpt_util.save_atomic({**state, "epoch": 3, "step_in_epoch": 3}, tmp_path / "checkpoint-last.pth")  # into epoch 3
    ckpt_util.save_atomic({**state, "epoch": 0}, tmp_path / "checkpoint-99.pth")  # a bigger name, a newer mtime
    later = time.time() + 100
    os.utime(tmp_path / "checkpoint-99.pth", (later, later))
    torch.save({"w": torch.zeros(4)}, tmp_path / "checkpoint-7.pth")  # a state dict, not a training checkpoint
    (tmp_path / "checkpoint-8.pth").write_bytes((tmp_path / "checkpoint-2.pth").read_bytes()[:300])  # truncated
    assert ckpt_util.find_resume(tmp_path).name == "checkpoint-last.pth"
    skipped = sorted(r.getMessage() for r in caplog.records)
    assert skipped[0] == (f"skipping checkpoint {tmp_path / 'checkpoint-7.pth'}: not a training checkpoint (no "
                          f"'model' and 'epoch' entries)")
    assert skipped[1].startswith(f"skipping checkpoint {tmp_path / 'checkpoint-8.pth'}: unreadable (")
    assert len(skipped) == 2

    flip_a_byte_in_a_tensor(tmp_path / "checkpoint-last.pth")
    caplog.clear()
    assert ckpt_util.find_resume(tmp_path).name == "checkpoint-2.pth"  # the next furthest
    assert any(r.getMessage().startswith(f"skipping checkpoint {tmp_path / 'checkpoint-last.pth'}: corrupt (Bad CRC-32")
               for r in caplog.records)


def test_files_without_checksums_are_read_and_said_to_be_unverified(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 1}, legacy, _use_new_zipfile_serialization=False)
    assert ckpt_util.verify(str(legacy)) is False
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"model": {"w": torch.ones(3)}, "epoch": 1}, tmp_path / "nocrc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    assert ckpt_util.verify(str(tmp_path / "nocrc.pth")) is False
    assert ckpt_util.read_checkpoint(str(legacy), check=True)["epoch"] == 1
    ckpt_util.save_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, tmp_path / "ours.pth")
    assert ckpt_util.verify(str(tmp_path / "ours.pth")) is True


# --------------------------------------------------------------------------------------------
# one run per output folder


def test_a_second_run_on_a_locked_folder_is_refused_and_a_killed_holder_s_lock_is_taken_over(
        small_folder, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_folder / "train", data / "train")
    pipe = first_sample_of(data / "train", rank=0, world=1)
    image = replace_by_pipe(pipe)
    out = tmp_path / "run"
    args = [*TINY, "--data_path", data, "--output_dir", out, "--epochs", 1]
    first = popen(["main_pretrain.py", *args], clean_env())
    try:
        # the first run holds the folder once it reads its first image: a reader on the pipe
        deadline = time.time() + 300
        while True:
            try:
                writer = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert first.poll() is None and time.time() < deadline, first.communicate()
                time.sleep(0.05)
        assert cli(*args[len(TINY):]) == 2
        err = capsys.readouterr().err
        (line,) = error_lines(err)
        assert line.startswith(f"error: --output_dir {str(out)!r} is in use by PID {first.pid} on host "
                               f"{socket.gethostname()} (main_pretrain.py --model deepmim_vit_tiny_patch4 ")
        assert line.endswith("Wait for that run to end, stop it, or choose another --output_dir.")
        assert not (out / "log.txt").exists()  # the refused run wrote nothing
        first.kill()
        first.wait()
        os.close(writer)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    pipe.unlink()
    pipe.write_bytes(image)

    assert cli(*args[len(TINY):]) == 0  # the dead run's lock is free: taken over, with a message
    err = capsys.readouterr().err
    assert (f"{out}: took over the lock left by PID {first.pid} on host {socket.gethostname()} "
            f"(main_pretrain.py --model") in err
    assert "no longer running" in err
    assert epochs_logged(out) == [0]
    assert (out / lock_util.LOCK_NAME).read_bytes() == b""  # released cleanly at the end


def test_the_lock_is_per_folder_in_one_process_and_a_lock_from_another_host_is_taken_over_with_a_warning(tmp_path):
    with start_run(RunConfig(device="cpu", output_dir=str(tmp_path / "a"))) as run:
        held = run.lock.holder()
        assert (held.host, held.pid) == (socket.gethostname(), os.getpid())
        with pytest.raises(UserError, match="is already in use by a run in this process"):
            start_run(RunConfig(device="cpu", output_dir=str(tmp_path / "a")))
        with start_run(RunConfig(device="cpu", output_dir=str(tmp_path / "b"))):  # another folder: fine
            pass
    with start_run(RunConfig(device="cpu", output_dir=str(tmp_path / "a"))) as run:  # released: fine
        assert run.lock.previous is None

    (tmp_path / "c").mkdir()
    left = {"host": "gpu17", "pid": 4242, "started": "2026-01-01 00:00:00", "command": "main_pretrain.py"}
    (tmp_path / "c" / lock_util.LOCK_NAME).write_text(json.dumps(left))
    lock = lock_util.acquire(tmp_path / "c")
    try:
        assert lock.takeover_message() == (
            f"{tmp_path / 'c'}: took over the lock left by PID 4242 on host gpu17 (main_pretrain.py, started "
            f"2026-01-01 00:00:00). The lock was free, so that run has ended, unless this file system does not share "
            f"locks between hosts; if it is still running on gpu17, stop one of the two runs")
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------
# exit status under the launchers


@pytest.mark.slow  # siblings: test_trainer's in-process SIGTERM of every job, test_loaders' SIGTERM with workers
def test_sigterm_to_the_torchrun_script_stops_every_rank_cleanly_exits_3_and_prints_no_traceback(small_folder,
                                                                                                tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_folder / "train", data / "train")
    pipe = first_sample_of(data / "train", rank=1, world=2)
    image = replace_by_pipe(pipe)
    out = tmp_path / "run"
    env = clean_env(NPROC="2", TORCHRUN=f"{sys.executable} -m torch.distributed.run", TMPDIR=str(tmp_path))
    script = subprocess.Popen(["bash", ROOT / "scripts" / "train_single_node.sh", "main_pretrain.py", *PRETRAIN,
                               "--data_path", data, "--output_dir", out, "--num_workers", "0"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(pipe, "wb") as f:  # returns when rank 1 opens its first image
        os.kill(script.pid, signal.SIGTERM)  # the script passes it on to the training processes
        f.write(image)
    stdout, err = script.communicate(timeout=300)
    assert script.returncode == 3, err
    assert "Traceback" not in err and "ChildFailedError" not in err and "error:" not in err
    stopped = [ln for ln in err.splitlines() if ln.startswith("stopped: SIGTERM received: wrote")]
    assert len(stopped) == 2, err  # both ranks, at the same step
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] > 0
    assert stopped[0].endswith(f"at epoch 0, iteration {ckpt['step_in_epoch']}; rerun the same command to continue")
    assert not list(tmp_path.glob("deepmim-preempted.*"))  # the marker is the script's, removed
    assert (out / lock_util.LOCK_NAME).read_bytes() == b""  # rank 0 held the folder, and released it


def fake_srun(bindir: Path, status: int, marker: str) -> None:
    """An ``srun`` that does what the tasks do on a clean stop (``marker``: the marker's lines, or
    nothing) and then exits with ``status``, as srun may report it."""
    bindir.mkdir(exist_ok=True)
    write = f'printf "{marker}" > "$DEEPMIM_PREEMPTED_FILE"\n' if marker else ""
    (bindir / "srun").write_text(f"#!/bin/sh\n{write}exit {status}\n")
    (bindir / "srun").chmod(0o755)
    (bindir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{bindir}/scontrol.log"\n')
    (bindir / "scontrol").chmod(0o755)


@pytest.mark.parametrize("srun_status, marker, status, said, requeue", [
    (0, "signal=SIGTERM\\nrequeued=\\n", 3, "SLURM requeues a preempted job, a cancelled one stays cancelled", None),
    (137, "signal=SIGUSR1\\nrequeued=123456\\n", 3, "stopped by SIGUSR1 after writing checkpoint-last.pth; job 123456 "
                                                  "requeued", None),
    (0, "signal=SIGUSR1\\nrequeued=\\n", 3, "job 123456 requeued", "requeue 123456\n"),  # the tasks' requeue failed
    (143, "", 143, "failed (status 143)", None),  # no marker: a failure
    (3, "", 3, "stopped by a signal after writing checkpoint-last.pth", None),
])
def test_the_sbatch_script_reads_the_tasks_marker_whatever_srun_reports(tmp_path, srun_status, marker, status, said,
                                                                        requeue):
    bindir = tmp_path / "bin"
    fake_srun(bindir, srun_status, marker)
    env = {**clean_env(PATH=f"{bindir}:{os.environ['PATH']}", TMPDIR=str(tmp_path)), "SLURM_JOB_ID": "123456",
           "SLURM_NNODES": "1", "SLURM_NTASKS": "8"}
    job = subprocess.run(["bash", ROOT / "scripts" / "slurm_train.sbatch", "main_pretrain.py"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert job.returncode == status, job.stdout + job.stderr
    assert said in job.stdout
    log = bindir / "scontrol.log"
    assert (log.read_text() if log.exists() else None) == requeue
    assert not list(tmp_path.glob("deepmim-preempted.*"))


# --------------------------------------------------------------------------------------------
# 16-bit images


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A real 16-bit PNG (gray, gray + alpha, RGB or RGBA by the channel count of ``pixels`` [H, W, C])."""
    h, w, c = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    expected = (ramp >> 8).astype(np.uint8)  # the high byte, as Pillow reads 16-bit RGB
    Image.frombytes("I;16", (64, 64), ramp.astype("<u2").tobytes()).save(tmp_path / "gray.png")
    Image.frombytes("I;16B", (64, 64), ramp.astype(">u2").tobytes()).save(tmp_path / "gray.tif")
    write_png16(tmp_path / "gray_raw.png", ramp[..., None])
    write_png16(tmp_path / "rgb.png", np.stack([ramp, 65535 - ramp, np.full_like(ramp, 40000)], -1))
    write_png16(tmp_path / "rgba.png", np.stack([ramp, ramp, ramp, np.full_like(ramp, 65535)], -1))
    for name in ("gray.png", "gray.tif", "gray_raw.png", "rgba.png"):
        img = _load_image(str(tmp_path / name))
        assert img.mode == "RGB"
        for ch in range(3):
            np.testing.assert_array_equal(np.asarray(img)[..., ch], expected, err_msg=name)
    rgb = np.asarray(_load_image(str(tmp_path / "rgb.png")))
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 1], 255 - expected)
    assert (rgb[..., 2] == 40000 >> 8).all()
    assert len(np.unique(rgb[..., 0])) == 256  # every level, not 0 and 255 only
    eight = tmp_path / "eight.png"
    Image.fromarray(expected).save(eight)
    np.testing.assert_array_equal(np.asarray(_load_image(str(eight)))[..., 0], expected)  # 8-bit unchanged
