"""Command-line flags shared by the ``main_*`` scripts (MAE's names and meanings)."""
import argparse


def str2list(kind):
    """Parse ``"6,8,10,12"`` (or ``"6 8"``) into a list of ``kind``."""

    def parse(s: str):
        return [kind(x) for x in s.replace(",", " ").split()]

    return parse


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Output, device, seed, resume, data loading, distributed and precision flags."""
    g = parser.add_argument_group("run")
    g.add_argument("--data_path", default="digits", type=str,
                   help="ImageFolder root with train/ (and val/) inside, or 'digits' for the built-in dataset")
    g.add_argument("--output_dir", default="./output_dir", help="where checkpoints, log.txt and config.json go")
    g.add_argument("--log_dir", default=None, help="TensorBoard directory (default: --output_dir)")
    g.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint to resume from (default: newest in --output_dir)")
    g.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                   help="do not resume from the newest checkpoint found in --output_dir")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch when not resuming")
    g.add_argument("--num_workers", default=10, type=int)
    g.add_argument("--pin_mem", action="store_true", help="pin CPU memory for faster host-to-device copies")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True, auto_resume=True)
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision (auto: bf16 on GPUs that support it, else fp16; none on CPU)")
    g.add_argument("--log_every", default=20, type=int, help="iterations between log lines / TensorBoard points")
    g.add_argument("--save_every", default=20, type=int, help="epochs between numbered checkpoints")

    d = parser.add_argument_group("distributed")
    d.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    d.add_argument("--local_rank", "--local-rank", default=-1, type=int, dest="local_rank",
                   help="set by python -m torch.distributed.launch (either spelling)")
    d.add_argument("--dist_on_itp", action="store_true", help="OpenMPI launch (OMPI_COMM_WORLD_* variables)")
    d.add_argument("--dist_url", default="env://", help="rendezvous URL")
    d.add_argument("--dist_port", default=None, type=int, help="master port for SLURM launches (default MASTER_PORT or 29500)")


def add_optim_args(parser: argparse.ArgumentParser, blr: float, weight_decay: float, warmup_epochs: int) -> None:
    """Learning-rate schedule and weight decay (lr = blr * effective batch / 256 unless --lr is set)."""
    g = parser.add_argument_group("optimizer")
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute learning rate")
    g.add_argument("--blr", type=float, default=blr, metavar="LR",
                   help="base learning rate: lr = blr * total batch size / 256")
    g.add_argument("--min_lr", type=float, default=0.0, metavar="LR", help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=warmup_epochs, metavar="N", help="epochs of linear warm-up")
    g.add_argument("--fused_adamw", default=None, action=argparse.BooleanOptionalAction,
                   help="fused AdamW kernels (default: on for CUDA)")
