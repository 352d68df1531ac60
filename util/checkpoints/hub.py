"""Published weights by name, and turning any weight source into a local file.

:func:`resolve` takes what users pass to ``--finetune`` / ``--resume`` / ``tools/*``:

* a local file: returned as is;
* a name of :data:`PUBLISHED` (MAE's releases): downloaded once (see below);
* an ``http(s)://`` URL: downloaded once;
* ``hf-hub:ORG/NAME[@REVISION]``: the repository's ``model.safetensors`` (else ``pytorch_model.bin``)
  through ``huggingface_hub.hf_hub_download``, which honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` /
  ``HF_HOME`` and ``HF_TOKEN``. This gives the weight file only; ``timm.create_model('hf-hub:ORG/NAME',
  pretrained=True)`` also reads the repository's ``config.json`` (its ``pretrained_cfg``: architecture,
  classes, input size), which is how timm itself builds such a model;
* ``timm:MODEL.TAG`` (e.g. ``timm:vit_base_patch16_224.mae``): the file timm's pretrained config of
  that name points at (its Hugging Face repository, else its URL).

Downloads go to ``$DEEPMIM_CACHE/checkpoints`` when ``DEEPMIM_CACHE`` is set, else to torch hub's
``checkpoints`` folder (``$TORCH_HOME/hub/checkpoints``, where MAE's ``torch.hub`` calls and timm's URL
downloads already put these files, so they are reused). A download shows a progress bar, is written
to a temporary file and renamed only once its checksum matches (a mismatch deletes it), and is done
once: later calls, offline too, use the cached file. Processes sharing a cache (ranks of a node)
serialize on a lock file, so one downloads and the others wait. ``$DEEPMIM_MIRROR`` (a base URL)
replaces the host of the table's URLs, for clusters that reach an internal mirror only.

The reference DeepMIM release publishes its checkpoints only as a Google Drive folder
(:data:`REFERENCE_RELEASE`), without per-file URLs or checksums, so they have no names here: download
them from that folder and pass the file.
"""
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

from util.checkpoints.files import atomic_path
from util.run.errors import UserError

import torch

_log = logging.getLogger(__name__)

REFERENCE_RELEASE = "https://drive.google.com/drive/folders/1VLJX93RTnCLvIThLxmp71eBsm41HP0sw"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what a timm / transformers repo holds
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class Published:
    """One released checkpoint.

    Args:
        name: what users pass instead of a path.
        url: where it is published.
        layout: ``'mae'`` (encoder + MAE's one decoder), ``'reference'`` (reference DeepMIM decoders),
            ``'ours'``, ``'timm'`` or ``'encoder'`` (the ViT alone, with or without its head).
        kind: ``'pretrain'`` or ``'finetuned'``.
        model: this repo's model name the weights fit (``models_vit`` / ``models_deepmim``).
        sha256: full hex digest, where the publisher gives one.
        md5_prefix: the md5 prefix the publisher prints (MAE's README / FINETUNE.md), checked when
            no sha256 is known.
    """

    name: str
    url: str
    layout: str
    kind: str
    model: str
    sha256: Optional[str] = None
    md5_prefix: Optional[str] = None


_MAE = "https://dl.fbaipublicfiles.com/mae"
# MAE: README.md (pre-trained: the encoder only), FINETUNE.md (fine-tuned ViTs with fc_norm + head,
# ImageNet-1K top-1 83.664 / 85.952 / 86.928) and demo/mae_visualize.ipynb (encoder + decoder,
# pixel targets). MAE publishes 6-digit md5 prefixes and no sha256; the visualization weights have none.
_MAE_RELEASES = (  # (file under _MAE, layout, kind, model, md5 prefix)
    ("pretrain/mae_pretrain_vit_base.pth", "encoder", "pretrain", "vit_base_patch16", "8cad7c"),
    ("pretrain/mae_pretrain_vit_large.pth", "encoder", "pretrain", "vit_large_patch16", "b8b06e"),
    ("pretrain/mae_pretrain_vit_huge.pth", "encoder", "pretrain", "vit_huge_patch14", "9bdbb0"),
    ("finetune/mae_finetuned_vit_base.pth", "encoder", "finetuned", "vit_base_patch16", "1b25e9"),
    ("finetune/mae_finetuned_vit_large.pth", "encoder", "finetuned", "vit_large_patch16", "51f550"),
    ("finetune/mae_finetuned_vit_huge.pth", "encoder", "finetuned", "vit_huge_patch14", "2541f2"),
    ("visualize/mae_visualize_vit_base.pth", "mae", "pretrain", "mae_vit_base_patch16", None),
    ("visualize/mae_visualize_vit_large.pth", "mae", "pretrain", "mae_vit_large_patch16", None),
    ("visualize/mae_visualize_vit_large_ganloss.pth", "mae", "pretrain", "mae_vit_large_patch16", None),
)
PUBLISHED: Dict[str, Published] = {
    Path(file).stem: Published(Path(file).stem, f"{_MAE}/{file}", layout, kind, model, md5_prefix=md5)
    for file, layout, kind, model, md5 in _MAE_RELEASES
}


def register(entry: Published) -> None:
    """Add a checkpoint to :data:`PUBLISHED` (e.g. a lab's own releases on an internal server)."""
    PUBLISHED[entry.name] = entry


def cache_dir() -> Path:
    """The download folder: ``$DEEPMIM_CACHE/checkpoints``, else torch hub's ``checkpoints``."""
    root = os.environ.get("DEEPMIM_CACHE")
    return Path(root) / "checkpoints" if root else Path(torch.hub.get_dir()) / "checkpoints"


def resolve(source: str, sha256: Optional[str] = None) -> str:
    """A local file holding the weights ``source`` names (see the module docstring).

    Args:
        source: a path, a :data:`PUBLISHED` name, an http(s) URL, ``hf-hub:ORG/NAME[@REV]`` or
            ``timm:MODEL.TAG``.
        sha256: expected digest (or a prefix of it) of a download; overrides the table's checksum.

    Raises:
        UserError: unknown name, missing file, failed download, checksum mismatch.
    """
    source = str(source)
    if os.path.exists(source):
        return source
    if source.startswith(("http://", "https://")):
        return download(source, sha256)
    if source.startswith("hf-hub:"):
        return hf_hub_file(source[len("hf-hub:"):])
    if source.startswith("timm:"):
        return timm_file(source[len("timm:"):])
    if source in PUBLISHED:
        entry = PUBLISHED[source]
        return download(_mirrored(entry.url), sha256 or entry.sha256, None if sha256 else entry.md5_prefix)
    if os.sep in source or source.endswith(WEIGHT_SUFFIXES):
        raise UserError(f"Checkpoint {source!r} not found.")
    hint = (f" The reference DeepMIM checkpoints are published as a Google Drive folder only ({REFERENCE_RELEASE}): "
            f"download them there and pass the file." if "deepmim" in source.lower() else "")
    raise UserError(
        f"{source!r} is neither a file nor a known checkpoint name. Known names: {', '.join(sorted(PUBLISHED))}; "
        f"also accepted: an http(s) URL, hf-hub:ORG/NAME (Hugging Face hub) or timm:MODEL.TAG (timm's "
        f"pretrained weights).{hint}"
    )


def _mirrored(url: str) -> str:
    mirror = os.environ.get("DEEPMIM_MIRROR")
    if not mirror:
        return url
    return mirror.rstrip("/") + urlparse(url).path


def _digests(path: Path) -> Tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _check(path: Path, url: str, sha256: Optional[str], md5_prefix: Optional[str]) -> None:
    """Raise (after deleting ``path``) when its checksum differs from the expected one."""
    if not sha256 and not md5_prefix:
        return
    sha, md5 = _digests(path)
    if sha256 and not sha.startswith(sha256.lower()):
        got, want, algo = sha, sha256.lower(), "sha256"
    elif not sha256 and md5_prefix and not md5.startswith(md5_prefix.lower()):
        got, want, algo = md5, md5_prefix.lower(), "md5"
    else:
        return
    path.unlink(missing_ok=True)
    raise UserError(
        f"The file downloaded from {url} has {algo} {got}, but {want} was expected; it was deleted. "
        f"Rerun to download it again; if this persists, the server holds another file than the one published."
    )


def download(url: str, sha256: Optional[str] = None, md5_prefix: Optional[str] = None) -> str:
    """Download ``url`` once into :func:`cache_dir` (progress bar, checksum, atomic); return the path.

    A cached file is checked again when a checksum is known, and deleted if it does not match.
    """
    from filelock import FileLock

    name = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create the download folder {folder} ({e.strerror}); set DEEPMIM_CACHE elsewhere.") from None
    dest = folder / name
    with FileLock(str(folder / f".{name}.lock")):  # one download per cache, whatever the number of ranks
        if dest.exists():
            _check(dest, url, sha256, md5_prefix)
            return str(dest)
        _log.info("downloading %s to %s", url, dest)
        with atomic_path(dest) as tmp:  # checked before it takes the real name
            try:
                torch.hub.download_url_to_file(url, str(tmp), progress=True)
            except Exception as e:  # network errors come in many types
                raise UserError(
                    f"Could not download {url} ({e}). Offline? Download it elsewhere and pass the file, or put it "
                    f"in {folder}."
                ) from None
            _check(tmp, url, sha256, md5_prefix)
    return str(dest)


def hf_hub_file(spec: str, filenames: Tuple[str, ...] = HF_WEIGHT_FILES) -> str:
    """The first of ``filenames`` in Hugging Face repository ``ORG/NAME[@REVISION]``, via the hub cache.

    ``HF_HUB_OFFLINE=1`` reads the cache only; ``HF_HUB_CACHE`` / ``HF_HOME`` say where it is.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    repo_id, _, revision = spec.partition("@")
    tried = []
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, revision=revision or None)
        except EntryNotFoundError:  # not in the repository, or (offline) not in the cache
            tried.append(filename)
        except (RepositoryNotFoundError, HFValidationError) as e:
            raise UserError(f"hf-hub:{spec}: no such Hugging Face repository ({str(e).splitlines()[0]}).") from None
        except (HfHubHTTPError, OSError) as e:  # network failures
            raise UserError(f"hf-hub:{spec}: download failed ({str(e).splitlines()[0]}). Offline? "
                            f"Set HF_HUB_OFFLINE=1 to use the cache, or pass a local file.") from None
    where = f"the Hugging Face cache {constants.HF_HUB_CACHE}" + (
        " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " or the repository")
    raise UserError(f"hf-hub:{spec}: none of {', '.join(tried)} in {where}.")


def timm_file(name: str) -> str:
    """The weight file of timm's pretrained config ``MODEL.TAG`` (its hub repository, else its URL)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except Exception:  # timm raises different errors for unknown architectures and tags
        cfg = None
    if cfg is None:
        close = timm.list_pretrained(f"{name.split('.')[0]}*")[:10]
        raise UserError(f"timm:{name}: timm has no pretrained weights of that name"
                        + (f"; it has {', '.join(close)}." if close else "."))
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        return hf_hub_file(cfg.hf_hub_id, files)
    if cfg.url:
        return download(cfg.url)
    raise UserError(f"timm:{name}: its pretrained config names no file to download.")


def known_names() -> List[str]:
    """The names :func:`resolve` downloads by."""
    return sorted(PUBLISHED)
