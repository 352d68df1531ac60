"""The names ``--target`` / ``--ds_targets`` accept, and building the targets a run asks for.

``pixel`` (:class:`targets.pixel.PixelTarget`), ``hog`` (:class:`targets.hog.HOGTarget`), ``clip``
(:class:`targets.clip.CLIPTeacher`) and ``teacher`` (any frozen network, ``targets/teachers.py``).
Each distinct target is built once and runs once per step, however many supervised layers read it.
"""
import logging
from typing import Dict, List, Tuple

from util.config.registry import Registry
from util.run.errors import UserError

from targets.base import Student, Target, TargetConfig, check_grid
from targets.clip import CLIPTeacher, load_clip_visual
from targets.hog import HOGTarget
from targets.pixel import PixelTarget
from targets.teachers import build_teacher

_log = logging.getLogger(__name__)

TARGETS = Registry("reconstruction target")
TARGETS.register(lambda cfg, s: PixelTarget(s.img_size, s.patch_size, norm_pix=cfg.norm_pix_loss), "pixel")
TARGETS.register(lambda cfg, s: HOGTarget(s.img_size, s.patch_size), "hog")
TARGETS.register(lambda cfg, s: CLIPTeacher(load_clip_visual(cfg.clip_path, cfg.clip_model, cfg.clip_pretrained)),
                 "clip")
TARGETS.register(build_teacher, "teacher")


def layer_target_names(cfg: TargetConfig, num_layers: int, ds_layers=None) -> List[str]:
    """One target name per supervised layer from ``--target`` / ``--ds_targets``.

    Default: ``clip`` when ``--clip_path`` / ``--clip_model`` is given (the reference command line),
    else ``pixel``.
    """
    target, per_layer = cfg.target, cfg.ds_targets
    if per_layer:
        if target and any(n != target for n in per_layer):
            raise UserError(
                f"--target {target} and --ds_targets {','.join(per_layer)} disagree: give --target (one target for "
                f"every supervised layer) or --ds_targets (one per layer)."
            )
        if len(per_layer) != num_layers:
            raise UserError(
                f"--ds_targets names {len(per_layer)} target(s) but there are {num_layers} supervised layers"
                f"{' (--ds_layers ' + ','.join(map(str, ds_layers)) + ')' if ds_layers else ''}; give one per layer, "
                f"e.g. --ds_targets {','.join(['pixel'] * (num_layers - 1) + ['clip'])}."
            )
        names = list(per_layer)
    else:
        names = [target or ("clip" if cfg.uses_clip_flags else "pixel")] * num_layers
    for name in names:
        TARGETS.get(name)  # an unknown name lists the valid ones
    return names


def build_targets(cfg: TargetConfig, grid: Tuple[int, int], img_size: int, patch_size: int, num_layers: int,
                  ds_layers=None) -> Tuple[Dict[str, Target], List[str]]:
    """Targets named by the flags, each built once, and which one each supervised layer reconstructs.

    Returns:
        (targets, layer_targets): name -> :class:`Target` (each distinct target once, so each runs
        once per step), and one target name per supervised layer.
    """
    names = layer_target_names(cfg, num_layers, ds_layers)
    student = Student(tuple(grid), img_size, patch_size)
    targets: Dict[str, Target] = {}
    for name in dict.fromkeys(names):  # distinct, in layer order
        targets[name] = TARGETS.get(name)(cfg, student)
        check_grid(targets[name], name, grid, f"{img_size}px / patch {patch_size}")

    # flags that have no effect with these targets: say so rather than ignore them silently
    if cfg.norm_pix_loss and "pixel" not in targets:
        _log.info("--norm_pix_loss has no effect: no layer reconstructs pixels")
    open_clip_teacher = "teacher" in targets and str(cfg.teacher_model or "").startswith("open_clip")
    if cfg.uses_clip_flags and "clip" not in targets and not open_clip_teacher:
        _log.info("--clip_path / --clip_model have no effect: no layer uses the clip target")
    if "teacher" not in targets and any((cfg.teacher_model, cfg.teacher_weights, cfg.teacher_layer)):
        _log.info("--teacher_* flags have no effect: no layer uses the teacher target")
    return targets, names
