"""Loading every checkpoint a user is likely to have, and converting between layouts."""
import argparse
import functools
import http.server
import os
import threading
import zipfile

from util.checkpoints import convert, serialization
from util.run.errors import UserError

import pytest
import timm
import torch
from conftest import run_script
from safetensors import safe_open
from safetensors.torch import save_file

import models_deepmim
import models_vit
from tools import convert_checkpoint

PRE = dict(img_size=16, patch_size=4, embed_dim=48, depth=4, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
           decoder_num_heads=2)
HEAD_KEYS = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def vit(**kw):
    return models_vit.create_model("vit_tiny_patch4", **{"img_size": 16, "embed_dim": 48, "depth": 4,
                                                          "num_heads": 3, "num_classes": 10, **kw})


@pytest.fixture()
def pretrained(tmp_path):
    """This repo's pre-training checkpoint of a tiny DeepMIM (layers 2 and 4 supervised)."""
    torch.manual_seed(0)
    model = models_deepmim.DeepMIM(models_deepmim.DeepMIMConfig(**PRE, ds_layers=(2, 4)))
    path = tmp_path / "checkpoint-9.pth"
    torch.save({"model": model.state_dict(), "epoch": 9, "args": {"model": "tiny"},
                "model_cfg": model.cfg.to_dict()}, path)
    return model, path


def test_reference_layout_loads_with_exactly_head_keys_missing(pretrained, tmp_path):
    model, _ = pretrained
    ref = convert.ours_to_reference(model.state_dict())
    assert "decoder_embed1.weight" in ref and "decoder_blocks2.0.attn.qkv.weight" in ref and "mask_token2" in ref
    path = tmp_path / "deepmim_release.pth"
    torch.save({"model": ref, "epoch": 1599}, path)
    target = vit()
    missing, unexpected = convert.load_encoder(target, str(path))
    assert set(missing) == HEAD_KEYS
    assert torch.equal(target.blocks[3].mlp.fc1.weight, model.blocks[3].mlp.fc1.weight)
    assert torch.equal(target.pos_embed, model.pos_embed)

    del ref["blocks.3.mlp.fc1.weight"]
    torch.save({"model": ref}, path)
    with pytest.raises(UserError, match=r"lacks 1 encoder weight.*blocks.3.mlp.fc1.weight.*partly random"):
        convert.load_encoder(vit(), str(path))


@pytest.mark.parametrize("kind", ["ours", "mae", "timm", "encoder_prefixed", "safetensors"])
def test_every_supported_source_loads(pretrained, tmp_path, kind):
    model, path = pretrained
    sd = model.state_dict()
    encoder = convert.encoder_only(sd)
    if kind == "mae":  # one decoder with MAE's names
        mae = {k: v for k, v in sd.items() if not k.startswith("decoders.2.")}
        mae = {k.replace("decoders.4.embed", "decoder_embed").replace("decoders.4.blocks", "decoder_blocks")
               .replace("decoders.4.norm", "decoder_norm").replace("decoders.4.pred", "decoder_pred")
               .replace("decoders.4.mask_token", "mask_token"): v for k, v in mae.items()}
        assert convert.layout(mae) == "mae"
        path = tmp_path / "mae.pth"
        torch.save({"model": mae}, path)
    elif kind == "timm":
        path = tmp_path / "timm.pth"
        torch.save(encoder, path)
    elif kind == "encoder_prefixed":
        path = tmp_path / "backbone.pth"
        torch.save({"state_dict": {f"backbone.{k}": v for k, v in encoder.items()}}, path)
    elif kind == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in encoder.items()}, str(path))
    target = vit()
    missing, _ = convert.load_encoder(target, str(path))
    assert set(missing) == HEAD_KEYS
    assert torch.equal(target.patch_embed.proj.weight, model.patch_embed.proj.weight)


def test_position_embedding_is_resized_for_another_input_size(pretrained):
    model, path = pretrained
    target = vit(img_size=32)  # 8x8 grid instead of 4x4
    convert.load_encoder(target, str(path))
    assert target.pos_embed.shape == (1, 65, 48)
    same = vit()
    convert.load_encoder(same, str(path))
    assert torch.equal(same.pos_embed, model.pos_embed)  # identity at equal size


class Runs:
    """Unpickling it would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch ran",))


def test_loading_refuses_foreign_files_and_wrong_models(pretrained, tmp_path):
    _, path = pretrained
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="is not a ours / reference / mae / encoder checkpoint"):
        convert.load_encoder(vit(), str(foreign))
    with pytest.raises(UserError, match="has shape .* but the model expects"):
        convert.load_encoder(vit(embed_dim=96, num_heads=3), str(path))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, pickled)  # as MAE saved
    with pytest.raises(UserError, match="is not a ours / reference / mae / encoder checkpoint"):  # read, then refused
        convert.load_encoder(vit(), str(pickled))
    code = tmp_path / "code.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": Runs()}, code)
    with pytest.raises(UserError, match=r"unpickling it would import and call posix.system, i.e. run code"):
        convert.load_encoder(vit(), str(code))
    assert not (tmp_path / "ran").exists()


def test_url_is_downloaded_once_with_sha256_check(pretrained, tmp_path, monkeypatch):
    _, path = pretrained
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(path.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DEEPMIM_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_port}/{path.name}"
    try:
        import hashlib

        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        convert.load_encoder(vit(), url, sha256=digest[:16])
        convert.load_encoder(vit(), url)
        assert len(requests) == 1  # cached in the download folder after the first call
        assert (tmp_path / "cache" / "checkpoints" / path.name).exists()
        with pytest.raises(UserError, match="has sha256 .* but 0000 was expected"):
            convert.load_encoder(vit(), url, sha256="0000")
        with pytest.raises(UserError, match="Could not download"):
            convert.load_encoder(vit(), f"http://127.0.0.1:{server.server_port}/missing.pth")
    finally:
        server.shutdown()


def test_timm_export_loads_strictly_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = vit(img_size=32).eval()  # a "fine-tuned" model: fc_norm + head
    src = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": {}}, src)
    proc = run_script("tools/convert_checkpoint.py", src, tmp_path / "timm.pth", "--to", "timm")
    assert "global_pool='avg'" in proc.stdout
    sd = torch.load(tmp_path / "timm.pth", weights_only=True)
    ref = timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                        num_classes=10, global_pool="avg").eval()
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref(x), model(x), atol=1e-5)


def tool(*args):
    convert_checkpoint.main(convert_checkpoint.get_args_parser().parse_args([str(a) for a in args]))


def test_convert_tool_round_trips_and_refuses_unknown_files(pretrained, tmp_path):
    model, path = pretrained
    tool(path, tmp_path / "ref.pth", "--to", "reference")
    ref = torch.load(tmp_path / "ref.pth", weights_only=True)
    assert ref["epoch"] == 9 and "decoder_pred2.weight" in ref["model"]
    tool(tmp_path / "ref.pth", tmp_path / "ours.pth", "--to", "ours", "--ds_layers", "2,4", "--num_heads", "3",
         "--decoder_num_heads", "2")
    ours = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert ours["model"].keys() == model.state_dict().keys()
    assert all(torch.equal(ours["model"][k], v) for k, v in model.state_dict().items())
    rebuilt = models_deepmim.model_from_config(ours["model_cfg"])
    rebuilt.load_state_dict(ours["model"])  # strict: the inferred config matches
    assert rebuilt.cfg == model.cfg

    tool(path, tmp_path / "bb.pth", "--to", "backbone")
    bb = torch.load(tmp_path / "bb.pth", weights_only=True)["state_dict"]
    assert all(k.startswith("backbone.") for k in bb) and "backbone.blocks.0.attn.qkv.weight" in bb
    assert not any("decoder" in k for k in bb)
    tool(path, tmp_path / "enc.pth", "--to", "encoder")
    assert set(torch.load(tmp_path / "enc.pth", weights_only=True)) == {"model"}

    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, foreign)
    for to in ("ours", "reference", "timm", "backbone"):
        with pytest.raises(UserError, match=r"is not a .* checkpoint \(found the unknown layout"):
            tool(foreign, tmp_path / "x.pth", "--to", to)
    with pytest.raises(UserError, match=r"is not a reference / mae checkpoint \(found the ours layout"):
        tool(path, tmp_path / "x.pth", "--to", "ours")
    assert not (tmp_path / "x.pth").exists()


# --------------------------------------------------------------------------------------------
# exports that load in their target library (strict, equal outputs), inputs as MAE wrote them


def save_like_mae(path, state_dict, **args):
    """A checkpoint as MAE's / the reference's ``misc.save_model`` writes it: ``args`` is a Namespace."""
    torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1599, "scaler": {},
                "args": argparse.Namespace(**args)}, path)
    return path


def test_timm_safetensors_export_loads_with_pretrained_cfg_overlay(tmp_path, capsys):
    torch.manual_seed(0)
    model = vit(img_size=32).eval()  # a "fine-tuned" model: fc_norm + head
    src = save_like_mae(tmp_path / "checkpoint-best.pth", model.state_dict(), model="vit_tiny_patch4", lr=1e-3)
    out = tmp_path / "vit_timm.safetensors"
    # the default format from the name; heads cannot be read off weights
    tool(src, out, "--to", "timm", "--num_heads", "3")
    assert not zipfile.is_zipfile(out)  # real safetensors, not a torch zip under that name
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    call = capsys.readouterr().out.split("load strictly with ", 1)[1].strip()
    assert call.startswith("timm.create_model(") and f"pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}" in call
    ref = eval(call, {"timm": timm}).eval()  # the very call the tool prints
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref(x), model(x), atol=1e-6)
    target = vit(img_size=32)
    convert.load_encoder(target, str(out))  # and back through the repo's own loader
    assert torch.equal(target.head.weight, model.head.weight)


def test_encoder_exports_load_into_timm_vit_strictly(pretrained, tmp_path, capsys):
    model, path = pretrained
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the encoder on every patch (mask ratio 0, patches in order), after its final norm
        feats, _, _ = model.forward_encoder(x, mask_ratio=0.0, noise=torch.arange(16.0).expand(2, -1))
    for name, extra in (("enc.pth", ()), ("enc.safetensors", ()), ("enc.bin", ("--format", "safetensors"))):
        tool(path, tmp_path / name, "--to", "encoder", *extra)
        assert zipfile.is_zipfile(tmp_path / name) == (name == "enc.pth")
        call = capsys.readouterr().out.split("load strictly into ", 1)[1].strip()
        vit_timm = eval(call, {"timm": timm}).eval()
        sd = convert.state_dict_of(serialization.load_torch(str(tmp_path / name)), name)
        vit_timm.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert torch.allclose(vit_timm.forward_features(x), feats[-1], atol=1e-5)

    torch.manual_seed(1)
    finetuned = vit().eval()  # global pool: fc_norm is its final norm, kept in the encoder export
    src = save_like_mae(tmp_path / "ft.pth", finetuned.state_dict(), model="vit_tiny_patch4")
    tool(src, tmp_path / "ft_enc.safetensors", "--to", "encoder", "--num_heads", "3")
    call = capsys.readouterr().out.split("load strictly into ", 1)[1].strip()
    assert "global_pool='avg'" in call and "num_classes=0" in call
    vit_timm = eval(call, {"timm": timm}).eval()
    vit_timm.load_state_dict(serialization.load_torch(str(tmp_path / "ft_enc.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.allclose(vit_timm(x), finetuned.forward_head(finetuned.forward_features(x), pre_logits=True), atol=1e-5)


def test_reference_release_saved_like_mae_converts_to_ours_safetensors(pretrained, tmp_path):
    model, _ = pretrained
    src = save_like_mae(tmp_path / "deepmim_release.pth", convert.ours_to_reference(model.state_dict()),
                        model="mae_vit_base_patch16", norm_pix_loss=True, clip_path="/path/to/clip", lr=None)
    tool(src, tmp_path / "ours.safetensors", "--to", "ours", "--ds_layers", "2,4", "--num_heads", "3",
         "--decoder_num_heads", "2")
    ckpt = serialization.load_torch(str(tmp_path / "ours.safetensors"))
    assert ckpt["epoch"] == 1599 and ckpt["args"] == {"model": "mae_vit_base_patch16", "norm_pix_loss": True,
                                                      "clip_path": "/path/to/clip", "lr": None}
    rebuilt = models_deepmim.model_from_config(ckpt["model_cfg"])
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    assert rebuilt.cfg == model.cfg
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
    tool(src, tmp_path / "ours_torch.safetensors", "--to", "ours", "--ds_layers", "2,4", "--format", "torch")
    assert zipfile.is_zipfile(tmp_path / "ours_torch.safetensors")  # --format wins over the name
