"""Recovery without a human (util/run/recovery.py): with --on_nonfinite rollback a non-finite loss or a
--loss_spike sends the run back to its newest good state and past the batches of the log window that
diverged, and the run ends with the weights of a run that never diverged and skipped the same batches;
after --max_rollbacks the clear stop; ranks agree; a kill -9 after a rollback resumes exactly.

The trigger is the test-only DEEPMIM_SCALE_LOSS=<step>[@<rank>]:<factor> (nan: a non-finite loss)."""
import math

from util.run.errors import UserError
from util.run.recovery import NONFINITE, SPIKE, Recovery, RecoveryConfig, RollbackNeeded, Trip, injected
from util.run.schedule import EpochSchedule, IterationSchedule
from util.run.trainer import Trainer

import pytest
import torch
from conftest import assert_same_weights, clean_env, read_log, run_script, weights
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import PRETRAIN, check_ok, finish, popen, torchrun
from test_trainer import TINY_PRETRAIN, TINY_SEG

import main_pretrain
from Segmentation import train as seg_train


def pretrain(data, out, *extra):
    """TINY_PRETRAIN: epochs of 5 steps, a log line every 2 steps (windows [0, 2), [2, 4), [4, 5) of
    each epoch), checkpoint-last.pth at every epoch end."""
    return main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        [*TINY_PRETRAIN, "--data_path", str(data), "--output_dir", str(out), *map(str, extra)]))


def skipping(monkeypatch, record):
    """The reference run: the trainer starts with ``record``'s skip, as a run resumed after that rollback
    does, and nothing trips."""
    resume = Trainer.resume

    def resumed_with_the_rollback(self):
        start = resume(self)
        self.recovery.rollbacks = [dict(record)]
        return start

    monkeypatch.setattr(Trainer, "resume", resumed_with_the_rollback)


CASES = {  # DEEPMIM_SCALE_LOSS, flags, the rollback's log.txt record, where it is in log.txt
    "nan before the first checkpoint": (
        "3:nan", [], {"trigger": NONFINITE, "step": 3, "where": "step 3 (epoch 0, iteration 3)", "what": "the loss of L6",
                      "restored": "the state this run started from", "restored_step": 0, "skipped": [2, 4]},
        ["rollback", 0, 1]),
    "nan after a checkpoint": (
        "8:nan", [], {"trigger": NONFINITE, "step": 8, "where": "step 8 (epoch 1, iteration 3)", "what": "the loss of L6",
                      "restored": "checkpoint-last.pth", "restored_step": 5, "skipped": [7, 9]},
        [0, "rollback", 1]),
    "nan, then the rest of the epoch in float32": (
        "8:nan", ["--amp", "bf16", "--fp32_after_rollback"],
        {"trigger": NONFINITE, "step": 8, "where": "step 8 (epoch 1, iteration 3)", "restored": "checkpoint-last.pth",
         "restored_step": 5, "skipped": [7, 9], "fp32_until": 10}, [0, "rollback", 1]),
    "loss spike": (
        "8:1000", ["--loss_spike", 3, "--loss_spike_window", 2],
        {"trigger": SPIKE, "step": 8, "where": "step 8 (epoch 1, iteration 3)", "restored": "checkpoint-last.pth",
         "restored_step": 5, "skipped": [7, 9]},
        [0, "rollback", 1]),
}


FAST = ("nan after a checkpoint",)  # the others in test-all; siblings: this case, the stop after the last rollback
# (its first rollback is to the start state), the decisions below (the spike rule, fp32_until, full_precision)


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_a_rollback_ends_with_the_weights_of_a_run_that_skipped_the_same_batches(case, small_folder, tmp_path,
                                                                                   monkeypatch):
    scale, flags, expected, order = CASES[case]
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("DEEPMIM_SCALE_LOSS", scale)
    pretrain(small_folder, a, "--on_nonfinite", "rollback", *flags)
    monkeypatch.delenv("DEEPMIM_SCALE_LOSS")

    log = read_log(a)
    assert [r.get("epoch", "rollback" if "rollback" in r else None) for r in log] == order
    [record] = [r for r in log if "rollback" in r]
    assert record["rollback"] == 1 and {k: record[k] for k in expected} == expected
    if case == "loss spike":
        assert record["what"].startswith("the mean loss ") and "above 3 x " in record["what"]
    first, end = expected["skipped"]
    skipped = f"step {first}" if end - first == 1 else f"steps {first}-{end - 1} ({end - first} batches)"
    line = (f"rollback 1 of at most 3: {expected['trigger']} at {expected['where']} in {record['what']}; back to "
            f"{expected['restored']} (step {expected['restored_step']}), skipping {skipped}")
    assert line in (a / "train.log").read_text()
    ckpt = torch.load(a / "checkpoint-last.pth", weights_only=True)
    assert ckpt["rollbacks"] == [record]  # a resumed run skips and counts it
    events = EventAccumulator(str(a), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/rollback")] == [(expected["step"], 1.0)]

    with monkeypatch.context() as m:
        skipping(m, record)
        pretrain(small_folder, b, *flags)  # nothing trips here: the default --on_nonfinite stop would say so
    for name in ("checkpoint-0.pth", "checkpoint-1.pth"):
        wa, wb = weights(a / name), weights(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert all(torch.isfinite(t).all() for t in wa.values())
    assert read_log(b) == log  # the same epoch lines to the last digit, and the same rollback line
    if "--fp32_after_rollback" in flags:  # step 9 ran without autocast: with it, epoch 1 ends elsewhere
        with monkeypatch.context() as m:
            skipping(m, {k: v for k, v in record.items() if k != "fp32_until"})
            pretrain(small_folder, tmp_path / "bf16", *flags[:2])
        for name, same in (("checkpoint-0.pth", True), ("checkpoint-1.pth", False)):
            wa, wc = weights(a / name), weights(tmp_path / "bf16" / name)
            assert all(torch.equal(wa[k], wc[k]) for k in wa) == same, name


def test_the_stop_and_the_stop_after_the_last_rollback(small_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPMIM_SCALE_LOSS", "3:nan,8:nan")
    with pytest.raises(UserError, match=r"^Non-finite loss at step 3 \(epoch 0, iteration 3\) in the loss of L6\. "
                                        r"Training stopped; .*; --on_nonfinite rollback recovers by itself\.$"):
        pretrain(small_folder, tmp_path / "stop")
    assert not (tmp_path / "stop" / "log.txt").exists()

    out = tmp_path / "exhausted"
    with pytest.raises(UserError, match=r"^Non-finite loss at step 8 \(epoch 1, iteration 3\) in the loss of L6\. "
                                        r"Training stopped after 1 rollback \(--max_rollbacks 1\); checkpoints already "
                                        r"written are intact\. Lower the learning rate"):
        pretrain(small_folder, out, "--on_nonfinite", "rollback", "--max_rollbacks", 1)
    log = read_log(out)
    assert [r.get("epoch", "rollback" if "rollback" in r else None) for r in log] == ["rollback", 0]
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 0) and ckpt["rollbacks"] == [log[0]]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.slow  # sibling: test_the_skip_covers_whole_accumulation_groups_of_one_epoch_after_the_restored_step
def test_a_skip_may_take_a_whole_epoch_and_its_line_says_nothing_was_trained(small_folder, tmp_path, monkeypatch):
    # one log window per epoch: a NaN at its last step skips all of epoch 1
    monkeypatch.setenv("DEEPMIM_SCALE_LOSS", "9:nan")
    pretrain(small_folder, tmp_path, "--on_nonfinite", "rollback", "--log_every", 5)
    log = read_log(tmp_path)
    assert log[1]["skipped"] == [5, 10] and log[2]["epoch"] == 1
    assert math.isnan(log[2]["train_loss"]) and math.isnan(log[2]["train_lr"])  # no step trained, no mean
    w0, w1 = weights(tmp_path / "checkpoint-0.pth"), weights(tmp_path / "checkpoint-1.pth")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_the_flags_refuse_a_spike_factor_that_trips_on_noise(small_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain(small_folder, tmp_path / "o", "--loss_spike", 1)
    assert "--loss_spike 1: must be a number > 1 (a multiple of the running median)" in capsys.readouterr().err


@pytest.mark.slow  # siblings: the pretraining rollback (the same trainer), the log windows of both schedules below
def test_an_iteration_based_job_rolls_back_like_the_others(tmp_path, monkeypatch):
    # segmentation: 12 iterations, a log line (and a log.txt line) every 3, no checkpoint before the end
    def segment(out, *extra):
        return seg_train.main(seg_train.get_args_parser().parse_args([*TINY_SEG, "--output_dir", str(out), *extra]))

    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("DEEPMIM_SCALE_LOSS", "7:nan")
    segment(a, "--on_nonfinite", "rollback")
    monkeypatch.delenv("DEEPMIM_SCALE_LOSS")
    log = read_log(a)
    [record] = [r for r in log if "rollback" in r]
    assert {k: record[k] for k in ("step", "where", "restored", "restored_step", "skipped")} == {
        "step": 7, "where": "iteration 7", "restored": "the state this run started from", "restored_step": 0,
        "skipped": [6, 8]}
    assert [r.get("iteration", "rollback") for r in log if r.get("mode") != "val"] == [3, 6, "rollback", 9, 12]
    with monkeypatch.context() as m:
        skipping(m, record)
        segment(b)
    untimed = [{k: v for k, v in r.items() if k != "time"} for r in log]  # (seconds per iteration)
    assert [{k: v for k, v in r.items() if k != "time"} for r in read_log(b)] == untimed
    wa, wb = weights(a / "checkpoint-last.pth"), weights(b / "checkpoint-last.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------------------
# the decisions, one by one


def test_the_skip_covers_whole_accumulation_groups_of_one_epoch_after_the_restored_step():
    where = "step {}".format
    r = Recovery(RecoveryConfig("rollback", 5, steps_per_epoch=10, accum_iter=4, fp32_after_rollback=True))
    assert r.plan(Trip(NONFINITE, 6, "x", 5), 0, "checkpoint-last.pth", where)["skipped"] == [4, 8]
    assert r.plan(Trip(NONFINITE, 9, "x", 8), 0, "checkpoint-last.pth", where)["skipped"] == [8, 10]  # the epoch's end
    assert r.plan(Trip(NONFINITE, 16, "x", 12), 14, "checkpoint-last.pth", where)["skipped"] == [14, 18]  # 14: restored
    assert [x["rollback"] for x in r.rollbacks] == [1, 2, 3]
    assert [x["fp32_until"] for x in r.rollbacks] == [10, 20, 20]  # the rest of the epoch training resumes in
    assert [s for s in range(20) if r.skipped(s)] == [4, 5, 6, 7, 8, 9, 14, 15, 16, 17]
    assert [s for s in range(20) if r.full_precision(s)] == list(range(8, 20))  # (the loop skips 14-17 first)
    assert [x["rollback"] for x in r.ending_at(10)] == [2] and r.ending_at(9) == []
    assert Recovery(RecoveryConfig()).state() == {} and r.state()["rollbacks"] == r.rollbacks


def test_the_log_window_of_a_step_in_both_schedules():
    epochs = EpochSchedule(steps_per_epoch=5, log_every=2)  # windows restart with every epoch: [5, 7), [7, 9), [9, 10)
    assert [epochs.window_start(s) for s in range(5, 11)] == [5, 5, 7, 7, 9, 10]
    iterations = IterationSchedule(steps_per_epoch=5, log_every=3)  # windows across passes over the data
    assert [iterations.window_start(s) for s in range(5, 11)] == [3, 6, 6, 6, 9, 9]


def test_the_spike_rule_compares_with_the_median_of_the_last_windows():
    r = Recovery(RecoveryConfig("rollback", loss_spike=3.0, loss_spike_window=3))
    assert [r.spike(x, 10 * (i + 1), 10 * i) for i, x in enumerate([1.0, 5.0, 1.0, 2.9])] == [None] * 4
    assert r.history == [5.0, 1.0, 2.9]  # the last 3 windows; 5.0 tripped nothing: 3 windows were not there yet
    trip = r.spike(8.8, 50, 40)  # 8.8 > 3 x 2.9
    assert (trip.kind, trip.step, trip.window) == (SPIKE, 49, 40) and r.history == [5.0, 1.0, 2.9]
    assert trip.what == "the mean loss 8.8 of the log window above 3 x 2.9, the median of the last 3 windows"
    assert Recovery(RecoveryConfig()).spike(1e9, 10, 0) is None  # off by default


def test_the_decision_between_a_rollback_and_the_stop():
    trip = Trip(NONFINITE, 7, "the loss of L12", 6)
    with pytest.raises(UserError, match=r"^Non-finite loss at step 7 in the loss of L12\. Training stopped;"):
        Recovery(RecoveryConfig()).decide(trip, "step {}".format)
    r = Recovery(RecoveryConfig("rollback", max_rollbacks=2))
    for _ in range(2):
        with pytest.raises(RollbackNeeded):
            r.decide(trip, "step {}".format)
        r.plan(trip, 0, "checkpoint-last.pth", "step {}".format)
    with pytest.raises(UserError, match=r"stopped after 2 rollbacks \(--max_rollbacks 2\);"):
        r.decide(trip, "step {}".format)


def test_the_test_trigger_names_steps_ranks_and_factors(monkeypatch):
    monkeypatch.setenv("DEEPMIM_SCALE_LOSS", "8:nan, 3@1:1000")
    assert list(injected(0)) == [8] and math.isnan(injected(0)[8])
    assert injected(1)[3] == 1000.0 and list(injected(1)) == [8, 3]


# --------------------------------------------------------------------------------------------
# processes


@pytest.mark.slow  # siblings: the in-process rollbacks above (ranks agree through the same min-reduce in one process)
def test_two_processes_agree_on_the_step_and_end_equal_whichever_rank_diverged(small_folder, tmp_path):
    # 10 steps of 2 x 4 images per epoch, 2 accumulated steps per optimizer step, a log line every step.
    # Rank r's loss is NaN at step 5; the other rank's turns NaN at step 6, after the all-reduce: both
    # must take step 5, roll back to the start, skip the accumulation group [4, 6) and go on.
    runs = {r: tmp_path / f"nan_on_rank_{r}" for r in (0, 1)}
    procs = [popen(torchrun("main_pretrain.py", *PRETRAIN, "--data_path", small_folder, "--num_workers", "0",
                            "--on_nonfinite", "rollback", "--output_dir", out),
                   clean_env(tmp_path, DEEPMIM_SCALE_LOSS=f"5@{r}:nan")) for r, out in runs.items()]
    codes, errs = finish(procs)
    check_ok(codes, errs)
    line = ("rollback 1 of at most 3: non-finite loss at step 5 (epoch 0, iteration 5) in the loss of L6; back to the "
            "state this run started from (step 0), skipping steps 4-5 (2 batches)")
    for err in errs:
        assert line in err and "[rank 1] WARNING " + line in err  # both ranks, the same decision
    for out in runs.values():
        [record] = [r for r in read_log(out) if "rollback" in r]
        assert record["skipped"] == [4, 6]
    w0, w1 = (weights(out / "checkpoint-0.pth") for out in runs.values())
    assert all(torch.equal(w0[k], w1[k]) and torch.isfinite(w0[k]).all() for k in w0)


@pytest.mark.slow  # sibling: test_a_rollback_ends_with_the_weights_of_a_run_that_skipped_the_same_batches
@pytest.mark.parametrize("kill_after", ["checkpoint-last.pth:2", "log.txt:2"])
def test_a_kill_after_a_rollback_resumes_to_the_uninterrupted_run(kill_after, small_folder, tmp_path, monkeypatch):
    # log.txt:2 - the rollback's line, written when its skip ends (step 9): the rerun resumes from epoch 0,
    # drops that line and rolls back again; checkpoint-last.pth:2 - the end of epoch 1: the rerun starts past
    # the rollback, which its checkpoint records
    argv = [*TINY_PRETRAIN, "--epochs", "3", "--data_path", str(small_folder), "--on_nonfinite", "rollback"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    monkeypatch.setenv("DEEPMIM_SCALE_LOSS", "8:nan")
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([*argv, "--output_dir", str(full)]))
    proc = run_script("main_pretrain.py", *argv, "--output_dir", killed, check=False,
                      env={"DEEPMIM_KILL_AFTER": kill_after, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([*argv, "--output_dir", str(killed)]))  # the rerun
    rollbacks = (killed / "train.log").read_text().count("rollback 1 of at most 3")  # both runs' console lines
    assert rollbacks == {"log.txt:2": 2, "checkpoint-last.pth:2": 1}[kill_after]

    ref, got = read_log(full), read_log(killed)
    assert [r.get("epoch", "rollback") for r in got] == [0, "rollback", 1, 2]  # each line exactly once
    for ra, rb in zip(ref, got):  # floats to rounding: this process and the killed one may sum differently
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == (pytest.approx(ra[key], rel=1e-6, abs=1e-7) if isinstance(ra[key], float) else ra[key])
    for name in ("checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth"):
        assert_same_weights(weights(full / name), weights(killed / name))
    assert torch.load(killed / "checkpoint-last.pth", weights_only=True)["rollbacks"] == [ref[1]]
