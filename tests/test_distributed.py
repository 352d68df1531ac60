"""Distributed training, launchers, preemption and crash safety, with real processes (CPU, gloo).

Moments that matter (a signal mid-epoch, a kill during a save) are reached without timing: a
training image or the checkpoint's temporary file is replaced by a named pipe, and opening the
other end of the pipe returns exactly when the training process reaches it.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from util.checkpoints import reader as ckpt_util
from util.checkpoints.files import append_jsonl, check_free_space, temp_path
from util.run.dist import detect, first_slurm_host
from util.run.errors import Preempted, UserError
from util.run.preempt import EXIT_PREEMPTED
from util.run.schedule import rescale_step

import dist_step
import pytest
import torch
from conftest import NO_MONITORS, ROOT, TINY_DET, assert_same_weights, clean_env, free_port, read_log, run_script, weights
from torch.utils.data import DistributedSampler
from torchvision import datasets

import main_finetune
import main_pretrain

PRETRAIN = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--input_size", "16", "--device", "cpu",
            "--batch_size", "4", "--accum_iter", "2", "--epochs", "1", "--warmup_epochs", "1", "--blr", "1e-3",
            "--log_every", "1", "--save_every", "1", "--stop_check_every", "1", *NO_MONITORS]


# --------------------------------------------------------------------------------------------
# helpers




def popen(argv, env, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(procs, timeout=300):
    """Wait for every process; (returncodes, stderr texts)."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], [o[1] for o in outs]


def check_ok(codes, errs):
    assert codes == [0] * len(codes), "\n\n".join(errs)


def torchrun(*argv) -> list:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]


def first_sample_of(train_dir: Path, rank: int, world: int, seed: int = 0) -> Path:
    """The image that ``rank`` loads first in epoch 0 (the training sampler's permutation)."""
    samples = datasets.ImageFolder(str(train_dir)).samples
    sampler = DistributedSampler(range(len(samples)), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(0)
    return Path(samples[next(iter(sampler))][0])


def replace_by_pipe(path: Path) -> bytes:
    data = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return data


def fake_scontrol(tmp_path: Path) -> Path:
    """An ``scontrol`` on PATH that records its arguments (SLURM's own is not installed here)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "scontrol.log"
    (bindir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    (bindir / "scontrol").chmod(0o755)
    return log


# --------------------------------------------------------------------------------------------
# launchers


def test_torchrun_and_legacy_launch_environments():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    info = detect(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (3, 8, 3, "node0", 1234)
    # old torch.distributed.launch: no LOCAL_RANK variable, the local rank comes as a flag
    legacy = {k: v for k, v in env.items() if k != "LOCAL_RANK"}
    assert detect(legacy, local_rank_flag=1).local_rank == 1
    with pytest.raises(UserError, match=r"LOCAL_RANK \(or --local_rank\) missing"):
        detect(legacy)
    # LOCAL_RANK alone (a single process told which GPU to use)
    assert (detect({"LOCAL_RANK": "2"}).world_size, detect({"LOCAL_RANK": "2"}).local_rank) == (1, 2)
    assert detect({}).launcher == "single"
    assert detect({"MASTER_ADDR": "x", "MASTER_PORT": "1"}).launcher == "single"  # leftover exports only
    # every spelling torch.distributed.launch has used parses to the same flag
    for argv in (["--local-rank=1"], ["--local_rank", "1"], ["--local_rank=1"], ["--local-rank", "1"]):
        assert main_pretrain.get_args_parser().parse_args(argv).local_rank == 1
        assert main_finetune.get_args_parser().parse_args(argv).local_rank == 1


def test_slurm_environment_set_by_hand():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "32", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[003-004,9]"}
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 13, 32, 5)
    assert (info.master_addr, info.master_port) == ("gpu003", 29500)
    assert detect({**env, "MASTER_PORT": "4000"}).master_port == 4000
    assert detect({**env, "MASTER_PORT": "4000"}, dist_port=4100).master_port == 4100  # the flag wins
    assert detect({**env, "MASTER_ADDR": "login1"}).master_addr == "login1"
    assert detect({**env, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).launcher == "single"  # salloc shell
    # torchrun inside an sbatch job: torchrun's variables win over the job's
    both = {**env, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert (detect(both).launcher, detect(both).world_size) == ("torchrun", 2)
    for nodelist, first in [("gpu[003-004,9],cpu1", "gpu003"), ("node7", "node7"), ("a1,b2", "a1"),
                            ("rack[1-2]-node[05-08]", "rack1-node05"), ("n[9]-ib", "n9-ib")]:
        assert first_slurm_host(nodelist) == first
    with pytest.raises(UserError, match="Cannot parse SLURM_JOB_NODELIST"):
        first_slurm_host("gpu[003")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, r"Half-set distributed environment: RANK set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1", "LOCAL_RANK": "0"}, "set but RANK missing"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "Half-set SLURM environment: SLURM_LOCALID, SLURM_JOB_NODELIST missing"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1", "LOCAL_RANK": "0"}, "outside 0..WORLD_SIZE-1"),
    ({"RANK": "zero", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1", "LOCAL_RANK": "0"}, "RANK='zero' is not"),
])
def test_half_set_environments_are_refused(env, message):
    with pytest.raises(UserError, match=message):
        detect(env)


def test_openmpi_environment():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "MASTER_ADDR": "h", "MASTER_PORT": "7"}
    info = detect(env, dist_on_itp=True)
    assert (info.launcher, info.rank, info.world_size, info.master_addr, info.master_port) == ("openmpi", 2, 4, "h", 7)
    with pytest.raises(UserError, match="--dist_on_itp needs the OpenMPI variables OMPI_COMM_WORLD_SIZE"):
        detect({"OMPI_COMM_WORLD_RANK": "0"}, dist_on_itp=True)


def test_a_script_started_with_a_half_set_environment_says_so(tmp_path):
    proc = run_script("main_pretrain.py", "--output_dir", tmp_path / "o", check=False, env=clean_env(RANK="0"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: Half-set distributed environment: RANK set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK")
    assert not (tmp_path / "o").exists()  # refused before touching the output folder


# --------------------------------------------------------------------------------------------
# equivalence: 2 processes = 1 process


def test_one_step_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    ddp = popen(torchrun(ROOT / "tests" / "dist_step.py", tmp_path), clean_env(tmp_path))
    dist_step.main(tmp_path)  # one process, whole batch, here (while torchrun starts)
    check_ok(*finish([ddp]))
    for name in ("pretrain", "finetune", "detect"):
        one, two = torch.load(tmp_path / f"{name}-w1.pt"), torch.load(tmp_path / f"{name}-w2.pt")
        assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 100
        for k, g in one["grads"].items():  # averaged over ranks (and accumulation steps), not summed
            assert (g - two["grads"][k]).abs().max() <= 1e-5 * g.abs().max() + 1e-9, (name, k)
        assert_same_weights(one["weights"], two["weights"], atol=1e-5)
        changed = sum(not torch.equal(one["weights"][k], w) for k, w in one["initial"].items())
        assert changed > 100, "the step must update the weights"


@pytest.mark.slow  # sibling: test_shards' test_eval_reads_each_image_once_across_ranks (the same split, in-process)
def test_dist_eval_counts_every_image_once(small_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_folder / "val", data / "val")
    next((data / "val" / "7").iterdir()).unlink()  # 39 images: not divisible by 2
    args = ["--eval", "--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--data_path", str(data),
            "--batch_size", "8", "--num_workers", "0"]
    ddp = popen(torchrun("main_finetune.py", *args, "--dist_eval", "--output_dir", tmp_path / "ddp"), clean_env(tmp_path))
    single = main_finetune.main(main_finetune.get_args_parser().parse_args([*args, "--output_dir", str(tmp_path / "one")]))
    (code,), (err,) = finish([ddp])
    assert code == 0, err
    assert single["count"] == 39
    line = [ln for ln in err.splitlines() if "val top-1" in ln]
    assert len(line) == 1, err  # rank 1 logs nothing
    assert line[0].split("val top-1 ")[1] == (f"{single['acc1']:.2f}% top-5 {single['acc5']:.2f}% "
                                              f"loss {single['loss']:.4f} on 39 images")
    assert 0 < single["acc1"] < 100  # a padded duplicate would change it


# --------------------------------------------------------------------------------------------
# preemption


@pytest.mark.slow  # siblings: test_trainer's in-process SIGTERM of every job, the SIGUSR1 test below
def test_sigterm_mid_epoch_checkpoints_exits_3_and_the_rerun_matches_an_uninterrupted_run(small_folder, tmp_path):
    # the same training uninterrupted, started with python -m torch.distributed.launch (it passes
    # --local-rank=N and sets LOCAL_RANK), on its own copy of the data, meanwhile
    shutil.copytree(small_folder / "train", tmp_path / "data_ref" / "train")  # 80 images: 10 iterations of 2 x 4
    full = tmp_path / "full"
    ref = popen(["-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port", str(free_port()),
                 "main_pretrain.py", *PRETRAIN, "--data_path", tmp_path / "data_ref", "--output_dir", full,
                 "--num_workers", "0"], clean_env(tmp_path))

    data = tmp_path / "data"
    shutil.copytree(small_folder / "train", data / "train")
    pipe = first_sample_of(data / "train", rank=1, world=2)
    image = replace_by_pipe(pipe)
    scontrol_log = fake_scontrol(tmp_path)
    out = tmp_path / "preempted"
    common = [*PRETRAIN, "--data_path", data, "--output_dir", out]

    # 1. srun-style: two tasks with SLURM's variables set by hand; SIGTERM reaches rank 1 (and its
    #    data-loader worker) only, while it loads its first batch
    port = str(free_port())
    tasks = [popen(["main_pretrain.py", *common, "--num_workers", "1"], clean_env(
        SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="777", MASTER_PORT=port, PATH=f"{scontrol_log.parent / 'bin'}:{os.environ['PATH']}"),
        start_new_session=True) for r in (0, 1)]
    with open(pipe, "wb") as f:  # returns when rank 1's worker opens the image
        os.killpg(tasks[1].pid, signal.SIGTERM)
        f.write(image)
    codes, errs = finish(tasks)
    assert codes == [EXIT_PREEMPTED] * 2, "\n\n".join(errs)
    assert f"distributed (slurm, gloo): 2 processes; master localhost:{port}" in errs[0]
    assert "epoch 0 [1/10]" in errs[0] and "epoch 0 [" not in errs[1]  # rank 1 logs warnings only
    for err in errs:
        assert err.strip().splitlines()[-1] == (f"stopped: SIGTERM received: wrote {out / 'checkpoint-last.pth'} at "
                                                f"epoch 0, iteration 2; rerun the same command to continue")
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    # both ranks stopped after the first optimizer step (2 accumulated iterations), rank 0 too
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 2)
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint-last.pth"]
    assert not scontrol_log.exists()  # SIGTERM: SLURM requeues preempted jobs itself, scancel must cancel

    # 2. rerun with old torch.distributed.launch's conventions: RANK etc. set, no LOCAL_RANK, the
    #    local rank as --local_rank N / --local-rank=N
    pipe.unlink()
    pipe.write_bytes(image)
    env = clean_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    reruns = [popen(["main_pretrain.py", *common, "--num_workers", "0", *flag], {**env, "RANK": str(r)})
              for r, flag in ((0, ["--local_rank", "0"]), (1, ["--local-rank=1"]))]
    codes, errs = finish(reruns)
    check_ok(codes, errs)
    assert f"resumed from {out / 'checkpoint-last.pth'}: continuing at epoch 0, iteration 2" in errs[0]

    check_ok(*finish([ref]))
    assert_same_weights(weights(out / "checkpoint-0.pth"), weights(full / "checkpoint-0.pth"))
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0]


FINETUNE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--batch_size", "8",
            "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-3", "--aa", "none", "--reprob", "0", "--num_workers", "0",
            "--log_every", "100", "--stop_check_every", "1"]


@pytest.mark.slow  # siblings: test_trainer's in-process SIGTERM of every job, test_reliability's torchrun SIGTERM
def test_sigusr1_in_a_slurm_job_checkpoints_requeues_once_and_finetuning_resumes(small_folder, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    pipe = first_sample_of(data / "train", rank=0, world=1)
    image = replace_by_pipe(pipe)
    scontrol_log = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{scontrol_log.parent / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    def finetune(out):
        return main_finetune.main(main_finetune.get_args_parser().parse_args(
            [*FINETUNE, "--data_path", str(data), "--output_dir", str(out)]))

    def time_limit_warning():  # SLURM's --signal=USR1@120, while the first batch is being read
        with open(pipe, "wb") as f:
            os.kill(os.getpid(), signal.SIGUSR1)
            f.write(image)

    out = tmp_path / "run"
    warn = threading.Thread(target=time_limit_warning)
    warn.start()
    with pytest.raises(Preempted, match=r"SIGUSR1 received: .* at epoch 0, iteration 1; .* \(SLURM job 4242 requeued\)"):
        finetune(out)
    warn.join()
    assert scontrol_log.read_text() == "requeue 4242\n"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers put back
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 1)

    pipe.unlink()
    pipe.write_bytes(image)
    resumed = finetune(out)  # the requeued job: the same command
    uninterrupted = finetune(tmp_path / "full")
    assert resumed["max_accuracy"] == uninterrupted["max_accuracy"]
    assert_same_weights(weights(out / "checkpoint-1.pth"), weights(tmp_path / "full" / "checkpoint-1.pth"))
    assert scontrol_log.read_text() == "requeue 4242\n"


def test_rescale_step_continues_after_the_same_samples():
    assert rescale_step(6, old_batch=8, new_batch=16) == 3
    assert rescale_step(6, 8, 16, accum_iter=2) == 2
    assert rescale_step(5, 8, 4, accum_iter=2) == 10
    # the real sampler: after k iterations of b on W processes, the samples used are the same set
    # as after rescale_step(k, b W, b' W') iterations of b' on W' processes
    n, seed = 97, 3

    def used(world, batch, steps):
        out = set()
        for r in range(world):
            s = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=seed, drop_last=True)
            out |= set(list(s)[:steps * batch])
        return out

    assert used(2, 4, 6) == used(4, 3, rescale_step(6, 2 * 4, 4 * 3)) == used(1, 8, rescale_step(6, 8, 8))


# --------------------------------------------------------------------------------------------
# crash safety


@pytest.mark.slow  # sibling: test_trainer's kill -9 after the commit's first file, resumed exactly
def test_kill_9_during_a_checkpoint_save_keeps_the_previous_one_and_auto_resume_uses_it(small_folder, tmp_path):
    out = tmp_path / "run"
    args = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--input_size", "16", "--device", "cpu",
            "--data_path", str(small_folder), "--num_workers", "0", "--batch_size", "4", "--log_every", "100",
            "--output_dir", str(out)]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([*args, "--epochs", "1"]))
    before = (out / "checkpoint-last.pth").read_bytes()

    child = popen(["main_pretrain.py", *args, "--epochs", "3"], clean_env())
    for line in child.stderr:  # started, resumed: its stale-file clean-up is done, epoch 1 begins
        if "resumed from" in line:
            break
    threading.Thread(target=child.stderr.read, daemon=True).start()  # keep its log pipe flowing
    partial = temp_path(out / "checkpoint-last.pth", pid=child.pid)  # the name save_atomic writes to
    os.mkfifo(partial)

    def unblock_if_the_child_ends():
        child.wait()
        try:
            os.close(os.open(partial, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    threading.Thread(target=unblock_if_the_child_ends, daemon=True).start()
    with open(partial, "rb") as f:  # returns when the child starts writing epoch 1's checkpoint
        head = f.read(4096)
        assert head[:2] == b"PK", "the child must be inside torch.save"  # a zip archive, partly written
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert partial.exists() and (out / "checkpoint-last.pth").read_bytes() == before
    assert torch.load(ckpt_util.find_resume(out), weights_only=True)["epoch"] == 0

    main_pretrain.main(main_pretrain.get_args_parser().parse_args([*args, "--epochs", "2"]))  # the same command
    assert not partial.exists()  # the partial file is cleaned up
    log = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    target = tmp_path / "checkpoint-last.pth"
    ckpt_util.save_atomic({"model": {"w": torch.zeros(3)}, "epoch": 4}, target)
    # the temporary file save_atomic opens leads to /dev/full, where every write fails with ENOSPC
    temp_path(target).symlink_to("/dev/full")
    with pytest.raises(UserError, match=r"Cannot write .*checkpoint-last.pth: No space left on the device \(.* free on "
                                        r"its file system\); the partial file was removed"):
        ckpt_util.save_atomic({"model": {"w": torch.ones(10**6)}, "epoch": 5}, target)
    assert torch.load(target, weights_only=True)["epoch"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


def test_a_disk_too_small_for_one_checkpoint_is_refused_at_start(tmp_path):
    huge = torch.nn.Linear(10**7, 10**7, device="meta")  # 10^14 parameters, never allocated
    size = ckpt_util.estimated_size(huge)
    assert size == 3 * 4 * (10**14 + 10**7)  # weights + two AdamW moments
    with pytest.raises(UserError, match=r"GiB free but one checkpoint needs about .* GiB. Free some space"):
        check_free_space(tmp_path, size, "one checkpoint")
    check_free_space(tmp_path, 1, "one checkpoint")


def test_a_partial_log_line_from_a_killed_run_is_dropped(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text('{"epoch": 0}\n{"epoch": 1, "train_lo')
    append_jsonl({"epoch": 1}, log)
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [0, 1]


# --------------------------------------------------------------------------------------------
# scripts/


def fake_tool(bindir: Path, name: str, status: int) -> Path:
    """``name`` on PATH: records its arguments and MASTER_PORT, exits with ``status``."""
    bindir.mkdir(exist_ok=True)
    log = bindir / f"{name}.log"
    (bindir / name).write_text(f'#!/bin/sh\necho "MASTER_PORT=$MASTER_PORT $*" >> "{log}"\nexit {status}\n')
    (bindir / name).chmod(0o755)
    return log


def test_slurm_scripts_submit_the_reference_jobs_and_report_preemption(tmp_path):
    sbatch = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    for option in ("--signal=USR1@120", "--requeue", "--open-mode=append", "--ntasks-per-node=8"):
        assert f"#SBATCH {option}" in sbatch
    bindir = tmp_path / "bin"
    srun_log = fake_tool(bindir, "srun", EXIT_PREEMPTED)
    sbatch_log = fake_tool(bindir, "sbatch", 0)
    env = {**clean_env(PATH=f"{bindir}:{os.environ['PATH']}"), "CLIP": "clip.pt", "DATA": "/imagenet", "CKPT": "pt.pth"}

    # the job body, as SLURM would run it: srun with one task per GPU, a port per job, status 3 explained
    job = subprocess.run(["bash", ROOT / "scripts" / "slurm_train.sbatch", "main_pretrain.py", "--epochs", "2"],
                         env={**env, "SLURM_JOB_ID": "123456", "SLURM_NNODES": "4", "SLURM_NTASKS": "32"},
                         capture_output=True, text=True, cwd=tmp_path)
    assert job.returncode == EXIT_PREEMPTED
    assert srun_log.read_text() == "MASTER_PORT=23456 --kill-on-bad-exit=1 python -u main_pretrain.py --epochs 2\n"
    assert "stopped by a signal after writing checkpoint-last.pth" in job.stdout

    # the reference submissions
    for script in ("slurm_pretrain.sh", "slurm_finetune.sh"):
        subprocess.run(["bash", ROOT / "scripts" / script], env=env, check=True, cwd=tmp_path)
    pretrain, finetune = sbatch_log.read_text().splitlines()
    assert f"--nodes 4 --job-name deepmim-pretrain {ROOT}/scripts/slurm_train.sbatch {ROOT}/main_pretrain.py " \
           f"--model mae_vit_base_patch16 --clip_path clip.pt --batch_size 128 --epochs 1600 --warmup_epochs 40 " \
           f"--blr 1.5e-4 --weight_decay 0.05 --mask_ratio 0.75 --data_path /imagenet" in pretrain
    assert f"--nodes 1 --job-name deepmim-finetune {ROOT}/scripts/slurm_train.sbatch {ROOT}/main_finetune.py " \
           f"--model vit_base_patch16 --finetune pt.pth --batch_size 128 --epochs 100 --blr 1e-4 --layer_decay 0.6 " \
           f"--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval" in finetune


def test_detection_trains_on_two_processes_and_its_sharded_evaluation_equals_one_process(small_coco, tmp_path):
    """Detection/train.py under torchrun (gloo): both ranks evaluate their shard, rank 0 runs COCOeval and
    every rank gets the numbers (a rank waiting for them would hang); one process's --eval of the same
    checkpoint gives the same numbers."""
    from Detection import train as det_train

    out = tmp_path / "ddp"
    proc = popen(torchrun(ROOT / "Detection" / "train.py", *TINY_DET, "--batch_size", "1", "--data_path", small_coco,
                          "--output_dir", out), clean_env(tmp_path))
    check_ok(*finish([proc]))
    val = [r for r in read_log(out) if r["mode"] == "val"]
    assert [(r["iteration"], r["images"]) for r in val] == [(4, 12), (8, 12)]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["args"]["world_size"] == 2
    results = json.loads((out / "coco_instances_results.json").read_text())
    val_ids = {img["id"] for img in json.loads((small_coco / "annotations" / "instances_val2017.json").read_text())["images"]}
    assert {r["image_id"] for r in results} == val_ids  # every image predicted (the tiny model keeps every detection)
    one = det_train.main(det_train.get_args_parser().parse_args(
        [*TINY_DET, "--data_path", str(small_coco), "--eval", "--resume", str(out / "checkpoint-last.pth"),
         "--output_dir", str(tmp_path / "one")]))
    assert one["bbox"]["AP"] == pytest.approx(val[-1]["bbox"]["AP"], abs=1e-9)
    assert one["segm"]["AP"] == pytest.approx(val[-1]["segm"]["AP"], abs=1e-9)
