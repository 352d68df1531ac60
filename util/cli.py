"""Command-line flags shared by the ``main_*`` scripts (MAE's names and meanings)."""
import argparse


def str2list(kind):
    """Parse ``"6,8,10,12"`` (or ``"6 8"``) into a list of ``kind``."""

    def parse(s: str):
        return [kind(x) for x in s.replace(",", " ").split()]

    return parse


def add_run_args(parser: argparse.ArgumentParser, by_epoch: bool = True) -> None:
    """Output, device, seed, resume, data loading, distributed and precision flags.

    ``by_epoch``: also MAE's epoch flags ``--start_epoch`` and ``--save_every`` (in epochs);
    iteration-based scripts define their own ``--save_every`` in iterations.
    """
    g = parser.add_argument_group("run")
    g.add_argument("--data_path", default="digits", type=str,
                   help="ImageFolder root with train/ (and val/) inside, 'digits' for the built-in dataset, or tar shards "
                        "(a folder of shards made by tools/make_shards.py, brace notation, pipe: URLs; 'digits-shards')")
    g.add_argument("--output_dir", default="./output_dir", help="where checkpoints, log.txt and config.json go")
    g.add_argument("--log_dir", default=None, help="TensorBoard directory (default: --output_dir)")
    g.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint to resume from (default: newest in --output_dir)")
    g.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                   help="do not resume from the newest checkpoint found in --output_dir")
    if by_epoch:
        g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch when not resuming")
    g.add_argument("--num_workers", default=10, type=int)
    g.add_argument("--decode", default="auto", choices=["auto", "pil", "nvjpeg"],
                   help="image decoding: auto (JPEGs decoded at reduced size when the crop allows, libjpeg-turbo; "
                        "other formats as pil), pil (the reference: PIL decodes every image whole), nvjpeg (JPEGs "
                        "decoded on the GPU)")
    g.add_argument("--shuffle_buffer", default=1000, type=int,
                   help="tar shards (--data_path train-{000000..001023}.tar): samples each loader worker shuffles in")
    g.add_argument("--pin_mem", action="store_true", help="pin CPU memory for faster host-to-device copies")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True, auto_resume=True)
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision (auto: bf16 on GPUs that support it, else fp16; none on CPU)")
    g.add_argument("--log_every", default=20, type=int, help="iterations between log lines / TensorBoard points")
    if by_epoch:
        g.add_argument("--save_every", default=20, type=int, help="epochs between numbered checkpoints")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (and the teacher, separately)")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute blocks in the backward pass: less activation memory, about 1/3 more compute")
    g.add_argument("--stop_check_every", default=10, type=int,
                   help="optimizer steps between the checks that stop every process after the same step on "
                        "SIGTERM / SIGUSR1 (each check: one tiny all-reduce on the CPU)")

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
                   help="fused AdamW kernels (default: on for CUDA and CPU)")


def add_classification_args(parser: argparse.ArgumentParser, model: str, epochs: int, batch_size: int,
                            global_pool: bool) -> None:
    """Flags shared by fine-tuning and linear probing (MAE's names)."""
    parser.add_argument("--batch_size", default=batch_size, type=int,
                        help="batch size per GPU (effective batch = batch_size * accum_iter * processes)")
    parser.add_argument("--epochs", default=epochs, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation iterations")
    m = parser.add_argument_group("model")
    # None: not given (the default below, or with --eval what the checkpoint stores)
    m.add_argument("--model", default=None, type=str, metavar="MODEL",
                   help=f"registered ViT name (default: {model}; with --eval: the checkpoint's)")
    m.add_argument("--input_size", default=None, type=int,
                   help="image size (default: the model's, 224 or 32; with --eval: the checkpoint's)")
    m.add_argument("--global_pool", action="store_true", default=None,
                   help=f"average-pool the patch tokens{' (default)' if global_pool else ''}")
    m.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help=f"use the cls token{'' if global_pool else ' (default)'}")
    m.add_argument("--nb_classes", default=None, type=int,
                   help="classes (default: the number of class folders; with --eval: the checkpoint's head)")
    m.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="clip gradient norm (default: off)")
    f = parser.add_argument_group("weights and evaluation")
    f.add_argument("--finetune", default="",
                   help="pre-trained weights: a file (this repo's, MAE's, the reference DeepMIM's, timm / .safetensors), a "
                        "published name (e.g. mae_pretrain_vit_base), an http(s) URL or hf-hub:ORG/NAME")
    f.add_argument("--finetune_sha256", default=None, help="expected sha256 (prefix) of a downloaded --finetune")
    f.add_argument("--eval", action="store_true",
                   help="only evaluate --resume (its head), else --finetune, else the newest checkpoint in --output_dir, "
                        "on data_path/val, with the model the checkpoint stores")
    f.add_argument("--dist_eval", action="store_true", help="shard evaluation over processes (each image once)")
    f.add_argument("--crop_scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (timm's default; small images such as digits want ~0.5 1)")
    f.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (0 for digits, text, ...)")
