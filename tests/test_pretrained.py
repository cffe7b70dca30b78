"""Pretrained encoders from local weight files: ``timm:<model>`` and ``torchvision:<model>`` (dxtrain.pretrained).

Models are created here without pretrained weights, their weights saved to a
temporary file and loaded back through ``--encoder-weights``; nothing is
downloaded.  The tests that need timm and torchvision skip where they cannot
be imported (the ``images`` extra; torchvision must be the build of the
installed torch), unless ``DXTRAIN_REQUIRE_ENCODERS=1`` (CI's encoder venv),
which makes that an error; the argument checks run everywhere.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dxtrain.pretrained import PretrainedEncoder, load_pretrained


def _importable(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as error:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
        return f"{type(error).__name__}: {error}"
    return None


WHY_NOT = _importable("timm") or _importable("torchvision")
if WHY_NOT and os.environ.get("DXTRAIN_REQUIRE_ENCODERS", "").strip() not in ("", "0"):
    raise RuntimeError(f"DXTRAIN_REQUIRE_ENCODERS is set but timm/torchvision cannot be imported ({WHY_NOT})")
needs_timm = pytest.mark.skipif(WHY_NOT is not None, reason=f"timm/torchvision cannot be imported here ({WHY_NOT})")


def test_a_pretrained_encoder_needs_its_weights_named_and_existing(tmp_path):
    with pytest.raises(ValueError, match=r"needs --encoder-weights FILE .* or --encoder-weights random"):
        load_pretrained("timm:resnet10t", weights=None)
    with pytest.raises(ValueError, match=r"--encoder-weights '.*nope.safetensors' \(for encoder 'timm:resnet10t'\) "
                                         r"does not exist"):
        load_pretrained("timm:resnet10t", weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="names no model"):
        load_pretrained("torchvision:", weights="random")
    with pytest.raises(ValueError, match="--encoder-size must be >= 8"):
        load_pretrained("timm:resnet10t", weights="random", size=4)


def test_encoder_weights_and_size_without_a_pretrained_encoder_are_refused():
    from dxtrain.train import TrainConfig

    for kw in ({"encoder_weights": "w.safetensors"}, {"encoder_size": 64}):
        with pytest.raises(ValueError, match=r"--encoder-weights and --encoder-size \(encoder_weights, encoder_size\) "
                                             r"apply to timm:<model> and torchvision:<model> encoders; encoder is 'auto'"):
            TrainConfig(**kw).validate()


@pytest.mark.skipif(WHY_NOT is None, reason="timm and torchvision import here")
def test_without_timm_the_error_says_what_to_install_and_why_the_import_failed():
    with pytest.raises(ValueError, match=r"needs timm \(pip install 'driftxpress\[images\]'\), and importing it failed"):
        load_pretrained("timm:resnet10t", weights="random")


def _save_safetensors(model: torch.nn.Module, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@needs_timm
def test_timm_weights_come_from_the_file_and_the_maps_are_the_models_own(tmp_path):
    import timm

    torch.manual_seed(0)
    full = timm.create_model("resnet10t", pretrained=False)
    path = _save_safetensors(full, tmp_path / "resnet10t.safetensors")
    enc = load_pretrained("timm:resnet10t", weights=path, size=40)
    assert isinstance(enc, PretrainedEncoder) and enc.size == 40 and enc.channels == 3
    mine = dict(enc.backbone.named_parameters())
    for name, p in full.named_parameters():  # every backbone weight is the file's (the head is dropped)
        if name in mine:
            torch.testing.assert_close(mine[name], p, rtol=0, atol=0)
    assert sum(name in mine for name, _ in full.named_parameters()) >= len(mine)
    # the maps: [-1, 1] -> [0, 1], resized to 40 px, normalised with the model's mean and std
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    cfg = full.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    ref_in = (torch.nn.functional.interpolate((x + 1) / 2, size=(40, 40), mode="bilinear", align_corners=False)
              - mean) / std
    full.eval(), enc.eval()
    with torch.no_grad():
        got = enc(x)
        want = full.forward_intermediates(ref_in, intermediates_only=True)
    assert [g.shape[1] for g in got] == enc.backbone.feature_info.channels()
    by_shape = {tuple(w.shape): w for w in want}
    for g in got:
        if tuple(g.shape) in by_shape:
            torch.testing.assert_close(g, by_shape[tuple(g.shape)], rtol=1e-4, atol=1e-5)
    assert sum(tuple(g.shape) in by_shape for g in got) >= 3


@needs_timm
def test_weights_of_another_model_are_refused_naming_the_file_and_the_encoder(tmp_path):
    import timm

    other = _save_safetensors(timm.create_model("resnet14t", pretrained=False), tmp_path / "resnet14t.safetensors")
    with pytest.raises(ValueError, match=r"--encoder-weights '.*resnet14t.safetensors' does not fit encoder "
                                         r"'timm:resnet10t'"):
        load_pretrained("timm:resnet10t", weights=other)
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        load_pretrained("timm:no_such_net", weights="random")


@needs_timm
def test_torchvision_resnet_from_a_state_dict_gives_its_four_stages(tmp_path):
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    enc = load_pretrained("torchvision:resnet18", weights=str(path), size=32).eval()
    x = torch.rand(2, 1, 20, 20) * 2 - 1  # grey: repeated to three channels
    with torch.no_grad():
        maps = enc(x)
        z = torch.nn.functional.interpolate((x.expand(-1, 3, -1, -1) + 1) / 2, size=(32, 32), mode="bilinear",
                                            align_corners=False)
        z = (z - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
            1, 3, 1, 1)
        z = model.maxpool(model.relu(model.bn1(model.conv1(z))))
        want = []
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            z = layer(z)
            want.append(z)
    assert [m.shape[1] for m in maps] == [64, 128, 256, 512]
    for g, w in zip(maps, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.save({"not": "weights"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_pretrained("torchvision:resnet18", weights=str(tmp_path / "bad.pth"))


@needs_timm
def test_torchvision_features_stack_keeps_the_last_block_of_each_resolution(tmp_path):
    enc = load_pretrained("torchvision:mobilenet_v3_small", weights="random", size=64).eval()
    with torch.no_grad():
        maps = enc(torch.zeros(1, 3, 64, 64))
    sides = [m.shape[-1] for m in maps]
    assert sides == sorted(set(sides), reverse=True) and sides[-1] == 2  # 32, 16, 8, 4, 2: one map each


@needs_timm
def test_training_with_a_timm_encoder_from_local_weights(tmp_path):
    """A CIFAR-format folder, a timm encoder from a safetensors file at 32 px: two steps, and the log says
    how many feature groups of which sizes."""
    import timm

    from test_image_data import make_cifar10
    from dxtrain.train import TrainConfig, train

    make_cifar10(tmp_path / "cifar", per_batch=8)
    weights = _save_safetensors(timm.create_model("resnet10t", pretrained=False), tmp_path / "w.safetensors")
    lines = []
    cfg = TrainConfig(data=str(tmp_path / "cifar"), out=str(tmp_path / "run"), steps=2, batch=20, positives=20,
                      landmarks=2, encoder="timm:resnet10t", encoder_weights=weights, encoder_size=32,
                      features=str(tmp_path / "feats.h5"), device="cpu", evaluate=False, progress=False)
    result = train(cfg, log=lines.append)
    assert result["step"] == 2 and np.isfinite(result["loss"])
    head = next(m for m in lines if m.startswith("data "))
    assert "features " in head and " group(s): " in head and "-D" in head, head
    assert os.path.isfile(tmp_path / "feats.h5")


@needs_timm
def test_a_dino_vit_runs_at_the_asked_size_with_its_weights_from_the_file(tmp_path):
    """DINOv2 weights saved at 518 px, loaded for 56 px input (the position embedding is resampled)."""
    import timm

    name = "vit_small_patch14_dinov2.lvd142m"
    path = _save_safetensors(timm.create_model(name, pretrained=False, depth=2), tmp_path / "dino.safetensors")
    with pytest.raises(ValueError, match="does not fit encoder"):  # 2 blocks saved, 12 expected
        load_pretrained(f"timm:{name}", weights=path, size=56)
    full = timm.create_model(name, pretrained=False)
    path = _save_safetensors(full, tmp_path / "dino12.safetensors")
    enc = load_pretrained(f"timm:{name}", weights=path, size=56).eval()
    with torch.no_grad():
        maps = enc(torch.zeros(2, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 384, 4, 4)] * len(maps) and len(maps) >= 1
    proj = [p for n, p in enc.backbone.named_parameters() if n.endswith("patch_embed.proj.weight")]
    assert len(proj) == 1  # the file's patch embedding (the position embedding alone is resampled)
    torch.testing.assert_close(proj[0], full.patch_embed.proj.weight, rtol=0, atol=0)


def test_bf16_runs_the_encoder_under_autocast_and_the_groups_stay_float32():
    from dxtrain.features import FeatureGroups, builtin_encoder
    from dxtrain.train import TrainConfig

    enc = builtin_encoder(3, seed=1)
    seen = []
    enc.register_forward_hook(lambda m, i, o: seen.append([t.dtype for t in o]))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    ref = FeatureGroups((3, 16, 16), enc, max_locations=2)(x)
    low = FeatureGroups((3, 16, 16), enc, max_locations=2, bf16=True)(x)
    assert seen[-1] and all(dt == torch.bfloat16 for dt in seen[-1]) and seen[0][0] == torch.float32
    assert set(low) == set(ref)
    for name, f in low.items():
        assert f.dtype == torch.float32
        torch.testing.assert_close(f, ref[name], rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="precision='fp8' is not valid"):
        TrainConfig(precision="fp8").validate()
