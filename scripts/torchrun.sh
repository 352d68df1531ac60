#!/usr/bin/env bash
# torchrun with the exit statuses of a plain run (used by train_single_node.sh / train_multi_node.sh):
#
#   scripts/torchrun.sh [torchrun options] main_{pretrain,finetune,linprobe}.py [flags]
#
# Exit status: 0 finished; 3 stopped by a signal after writing checkpoint-last.pth (rerun the same
# command to continue); otherwise torchrun's own (1: a process failed or refused; its traceback or
# 'error:' line says why).
#
# Why a wrapper: torchrun takes any non-zero exit of a worker for a failure. On the first one it
# SIGTERMs the others, prints its ChildFailedError report and exits 1, so a clean stop (status 3)
# would read as a crash. Here the workers report a clean stop in a marker file instead
# (DEEPMIM_PREEMPTED_FILE, util/run/preempt.py) and exit 0; torchrun ends quietly and this script exits 3.
#
# Signals: SIGTERM, SIGINT (Ctrl-C) and SIGHUP sent to this script reach the training processes as
# SIGTERM, SIGUSR1 as SIGUSR1, not torchrun: they finish the current step, write checkpoint-last.pth
# and exit. torchrun ignores SIGUSR1 (by default it would die of it, as SLURM signals every process
# of a job); when torchrun itself gets SIGTERM (SLURM again), it passes it on and waits up to
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (300 here; torch's default, 30, may cut a large checkpoint
# short) before it kills the workers, and prints a SignalException traceback of its own.
set -uo pipefail
set -m  # torchrun in a process group of its own, with SIGINT not ignored (a script's background jobs ignore it)
[ $# -ge 1 ] || { echo "usage: $0 [torchrun options] main_{pretrain,finetune,linprobe}.py [flags]" >&2; exit 2; }

marker=$(mktemp "${TMPDIR:-/tmp}/deepmim-preempted.XXXXXX") || exit 1
rm -f "$marker"  # only its name: rank 0 creates it on a clean stop
trap 'rm -f "$marker"' EXIT
export DEEPMIM_PREEMPTED_FILE=$marker
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments ("python -m torch.distributed.run")
(trap '' USR1; exec ${TORCHRUN:-torchrun} "$@") &
agent=$!

forward() {  # to the workers (torchrun's children); to torchrun itself while it has none yet
    pkill "-$1" -P "$agent" 2>/dev/null || kill "-$1" "$agent" 2>/dev/null
}
trap 'forward TERM' TERM INT HUP
trap 'forward USR1' USR1

while kill -0 "$agent" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait until torchrun has ended
    wait "$agent"
done
wait "$agent"  # its exit status (bash keeps it)
status=$?
if [ -e "$marker" ]; then
    status=3
fi
exit "$status"
