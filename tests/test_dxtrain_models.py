"""dxtrain generators, EMA and feature groups: shapes, conditioning, EMA math, gradients, encoder loading."""

import textwrap

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from dxtrain.features import FeatureGroups, builtin_encoder, load_encoder  # noqa: E402
from dxtrain.models import EMA, ConvGenerator, MLPGenerator, make_generator, sample_noise  # noqa: E402

IMAGE_SHAPES = [(1, 8, 8), (1, 16, 16), (1, 28, 28), (3, 32, 32), (3, 12, 20), (3, 5, 3)]


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


# --- generators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "auto"])
def test_vector_generator_shape(kind):
    g = make_generator(kind, (7,), noise_dim=5, width=16)
    assert isinstance(g, MLPGenerator) and g.noise_dim == 5
    assert g(sample_noise(g, 4, _rng())).shape == (4, 7)


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_conv_generator_shape_and_range(shape):
    g = make_generator("auto", shape, width=8)
    assert isinstance(g, ConvGenerator)
    out = g(sample_noise(g, 3, _rng()) * 10)  # large noise drives tanh towards its bounds
    assert out.shape == (3, *shape)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.isfinite(out).all()


def test_mlp_generates_images_when_asked():
    g = make_generator("mlp", (1, 8, 8), width=16)
    assert g(sample_noise(g, 2, _rng())).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("kind, shape", [("mlp", (6,)), ("conv", (1, 8, 8)), ("conv", (3, 12, 20))])
def test_class_conditioning_changes_output(kind, shape):
    g = make_generator(kind, shape, num_classes=3, width=8)
    noise = sample_noise(g, 3, _rng()).repeat(2, 1)
    labels = torch.tensor([0, 1, 2, 1, 2, 0])
    out = g(noise, labels)
    assert out.shape == (6, *shape)
    assert not torch.allclose(out[:3], out[3:])
    torch.testing.assert_close(g(noise, labels), out)  # same noise and labels, same samples


def test_label_mismatch_is_an_error():
    conditional = make_generator("mlp", (4,), num_classes=2)
    unconditional = make_generator("mlp", (4,))
    noise = sample_noise(conditional, 2)
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(noise)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(noise, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise must have shape"):
        conditional(torch.zeros(2, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("kind, shape", [("mlp", (3,)), ("conv", (1, 8, 8))])
def test_seeded_noise_is_deterministic(kind, shape):
    torch.manual_seed(1)
    g1 = make_generator(kind, shape, width=8)
    torch.manual_seed(1)
    g2 = make_generator(kind, shape, width=8)
    a = g1(sample_noise(g1, 4, _rng(7)))
    b = g2(sample_noise(g2, 4, _rng(7)))
    assert torch.equal(a, b)
    assert not torch.equal(a, g1(sample_noise(g1, 4, _rng(8))))


def test_make_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        make_generator("transformer", (1, 8, 8))
    with pytest.raises(ValueError, match="needs an image"):
        make_generator("conv", (5,))
    with pytest.raises(ValueError, match="sample_shape"):
        make_generator("auto", (8, 8))


# --- EMA ----------------------------------------------------------------------------------------


def test_ema_one_update_is_the_weighted_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    for name, p in ema.model.named_parameters():
        expected = 0.9 * old[name] + (1 - 0.9) * dict(model.named_parameters())[name]
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(ema.model[1].running_mean, torch.full((4,), 3.0))  # buffers copied

    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema.copy_to(target)
    for a, b in zip(target.state_dict().values(), ema.model.state_dict().values()):
        assert torch.equal(a, b)

    restored = EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 1
    assert torch.equal(restored.model[0].weight, ema.model[0].weight)


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(2, 2), decay=1.5)


# --- feature groups -----------------------------------------------------------------------------


def test_vector_groups_are_the_sample():
    groups = FeatureGroups((5,))
    x = torch.randn(3, 5, dtype=torch.float64)
    out = groups(x)
    assert groups.names == ["x"] and groups.dims == {"x": 5}
    assert out["x"].dtype == torch.float32 and torch.equal(out["x"], x.float())


def test_pixels_without_encoder():
    groups = FeatureGroups((3, 16, 16), "none")
    out = groups(torch.rand(2, 3, 16, 16))
    assert groups.names == ["pixels"] and out["pixels"].shape == (2, 768)


def _expected_names(maps, locations):
    """Group names for maps of the given (H, W) sizes; ``locations`` lists, per map, the kept (h, w)."""
    names = []
    for i, ((h, w), locs) in enumerate(zip(maps, locations)):
        names += [f"s{i}.loc{a}_{b}" for a, b in locs] + [f"s{i}.mean", f"s{i}.std"]
        for grid in (2, 4):
            if min(h, w) >= 2 * grid:
                names += [f"s{i}.p{grid}.mean", f"s{i}.p{grid}.std"]
    return names + ["pixels"]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16)])
def test_builtin_encoder_groups(shape):
    c, h, w = shape
    groups = FeatureGroups(shape, "builtin", max_locations=None)
    every = [[(a, b) for a in range(h) for b in range(w)], [(a, b) for a in range(h // 2) for b in range(w // 2)]]
    assert groups.names == _expected_names([(h, w), (h // 2, w // 2)], every)
    out = groups(torch.rand(2, *shape) * 2 - 1)
    assert list(out) == groups.names
    for name, value in out.items():
        assert value.shape == (2, groups.dims[name]) and value.dtype == torch.float32 and value.is_contiguous()
    assert groups.dims["s0.loc0_0"] == 32 and groups.dims["s1.mean"] == 64
    assert groups.dims["s0.p2.mean"] == 32 * 4 and groups.dims["s0.p4.std"] == 32 * 16
    # a 4x4 grid on a map smaller than 8x8 would make patches of one location (no spread): skipped
    assert ("s1.p4.std" in groups.dims) == (min(h, w) // 2 >= 8)
    assert groups.dims["pixels"] == c * h * w


class _FixedMap(nn.Module):
    """An 'encoder' that returns a given map whatever the input (plus 0 * x to keep the batch)."""

    def __init__(self, fmap):
        super().__init__()
        self.register_buffer("fmap", fmap)

    def forward(self, x):
        return self.fmap[: x.shape[0]] + 0 * x.sum()


def test_group_statistics_match_their_definition():
    fmap = torch.randn(2, 3, 4, 6)
    groups = FeatureGroups((1, 4, 6), _FixedMap(fmap), include_pixels=False, max_locations=None)
    out = groups(torch.zeros(2, 1, 4, 6))
    torch.testing.assert_close(out["s0.loc1_5"], fmap[:, :, 1, 5])
    torch.testing.assert_close(out["s0.mean"], fmap.mean((2, 3)))
    torch.testing.assert_close(out["s0.std"], fmap.std((2, 3), unbiased=False), rtol=1e-4, atol=1e-4)
    top_right = fmap[:, :, :2, 3:]  # cell (0, 1) of the 2x2 grid
    torch.testing.assert_close(out["s0.p2.mean"].reshape(2, 3, 2, 2)[:, :, 0, 1], top_right.mean((2, 3)))
    torch.testing.assert_close(out["s0.p2.std"].reshape(2, 3, 2, 2)[:, :, 0, 1],
                               top_right.std((2, 3), unbiased=False), rtol=1e-4, atol=1e-3)
    assert "pixels" not in out


def test_a_one_by_one_map_is_its_location_alone():
    """A 1x1 map (a CNN's last stage on small images) has no spread: its std would be a constant group and
    its mean the location itself, so only the location is kept."""
    fmap = torch.randn(2, 5, 1, 1)
    groups = FeatureGroups((1, 4, 4), _FixedMap(fmap), include_pixels=False)
    assert groups.names == ["s0.loc0_0"]
    torch.testing.assert_close(groups(torch.zeros(2, 1, 4, 4))["s0.loc0_0"], fmap[:, :, 0, 0])


def test_location_subsampling_is_an_even_fixed_grid():
    small = FeatureGroups((1, 8, 8), "builtin")  # maps 8x8 (64 locations) and 4x4 (16)
    locs0 = [n for n in small.names if n.startswith("s0.loc")]
    locs1 = [n for n in small.names if n.startswith("s1.loc")]
    assert locs0 == [f"s0.loc{a}_{b}" for a in (0, 2, 5, 7) for b in (0, 2, 5, 7)]
    assert len(locs1) == 16  # a map with <= 16 locations keeps them all
    four = FeatureGroups((1, 8, 8), "builtin", max_locations=4)
    assert [n for n in four.names if n.startswith("s0.loc")] == ["s0.loc0_0", "s0.loc0_7", "s0.loc7_0", "s0.loc7_7"]
    few = FeatureGroups((3, 12, 20), "builtin", max_locations=6)
    for scale in ("s0", "s1"):
        kept = [n for n in few.names if n.startswith(f"{scale}.loc")]
        assert 1 <= len(kept) <= 6
    assert "s0.loc0_0" in few.names and "s0.loc11_19" in few.names  # the grid spans the whole map


def test_gradients_reach_x_but_not_the_encoder():
    groups = FeatureGroups((3, 16, 16), "builtin")
    groups.train()  # a trainer calling .train() must not unfreeze the encoder
    assert not groups.encoder.training
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    total = sum(value.sum() for name, value in groups(x).items() if name != "pixels")
    total.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in groups.encoder.parameters():
        assert not p.requires_grad and p.grad is None


def test_std_gradient_is_finite_on_constant_input():
    groups = FeatureGroups((1, 8, 8), "builtin")
    x = torch.zeros(2, 1, 8, 8, requires_grad=True)
    sum(value.sum() for value in groups(x).values()).backward()
    assert torch.isfinite(x.grad).all()


def test_builtin_encoder_is_deterministic_given_seed():
    x = torch.rand(2, 3, 8, 8)
    a, b, c = builtin_encoder(3, seed=4), builtin_encoder(3, seed=4), builtin_encoder(3, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))
    assert not torch.equal(a(x)[0], c(x)[0])
    assert [t.shape for t in a(x)] == [(2, 32, 8, 8), (2, 64, 4, 4)]


def test_wrong_sample_shape_is_an_error():
    with pytest.raises(ValueError, match=r"expected samples of shape \(B, 1, 8, 8\)"):
        FeatureGroups((1, 8, 8))(torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match="for images"):
        FeatureGroups((5,), "builtin")


# --- load_encoder -------------------------------------------------------------------------------


class _TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # recent torch deprecates TorchScript; users still ship it
def test_load_torchscript_encoder(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.script(_TinyEncoder()), str(path))
    encoder = load_encoder(str(path))
    assert not encoder.training and all(not p.requires_grad for p in encoder.parameters())
    groups = FeatureGroups((1, 8, 8), str(path))
    assert groups.dims["s0.mean"] == 4 and groups.dims["s0.p4.std"] == 64
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    groups(x)["s0.mean"].sum().backward()
    assert x.grad.abs().sum() > 0


def test_load_callable_encoder(tmp_path, monkeypatch):
    (tmp_path / "my_encoders.py").write_text(textwrap.dedent("""
        import torch
        def vector_encoder():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        def not_a_module():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    encoder = load_encoder("my_encoders:vector_encoder")
    assert isinstance(encoder, nn.Module) and not encoder.training
    groups = FeatureGroups((1, 8, 8), "my_encoders:vector_encoder")
    assert groups.names == ["s0", "pixels"] and groups.dims == {"s0": 10, "pixels": 64}
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        load_encoder("my_encoders:not_a_module")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_encoder("my_encoders:missing")


@pytest.mark.parametrize("spec, message", [
    ("resnet", "unknown encoder spec 'resnet'; valid:"),
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("/nonexistent/encoder.pt", "does not exist"),
    ("builtin", "needs in_channels"),
    (":make", "must look like"),
])
def test_bad_encoder_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_encoder(spec)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_state_dict_file_is_not_torchscript(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(_TinyEncoder().state_dict(), str(path))
    with pytest.raises(ValueError, match="is not a TorchScript module"):
        load_encoder(str(path))


def test_encoder_output_must_be_a_map_or_vector():
    class Tokens(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # (B, L, C)

    with pytest.raises(ValueError, match="feature map or a"):
        FeatureGroups((2, 4, 4), Tokens())



# --- the UNet generator (dxtrain/unet.py) --------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 32, 32), (3, 64, 64)])
def test_unet_shapes_range_and_noise_image(shape):
    g = make_generator("unet", shape, width=8, depth=1, num_classes=4)
    assert g.noise_dim == shape[0] * shape[1] * shape[2]  # a noise image of the sample's shape
    out = g(sample_noise(g, 3, _rng()) * 10, torch.tensor([0, 1, 3]))
    assert out.shape == (3, *shape) and torch.isfinite(out).all() and out.abs().max() <= 1


@pytest.mark.parametrize("kind, shape", [("unet", (3, 32, 32)), ("conv", (1, 8, 8)), ("mlp", (6,))])
def test_conditioning_on_class_and_the_guidance_scale(kind, shape):
    g = make_generator(kind, shape, width=8, num_classes=3, guidance=True, **({"depth": 1} if kind != "conv" else {}))
    noise = sample_noise(g, 3, _rng()).repeat(2, 1)
    labels = torch.tensor([0, 1, 2, 1, 2, 0])
    with torch.no_grad():
        plain = g(noise, labels)
        assert not torch.allclose(plain[:3], plain[3:])  # same noise, other class
        torch.testing.assert_close(g(noise, labels, alpha=1.0), plain)  # alpha defaults to 1 (no guidance)
        guided = g(noise, labels, alpha=torch.tensor([1.0, 2.0, 4.0] * 2))
        torch.testing.assert_close(guided[0], plain[0])
        assert (guided[1:3] - plain[1:3]).abs().max() > 1e-4  # alpha is an input
        torch.testing.assert_close(g(noise[2:3], labels[2:3], alpha=4.0), guided[2:3])  # a number: every sample
    g.zero_grad()
    g(noise, labels, alpha=torch.full((6,), 2.0)).square().mean().backward()
    assert g.class_embedding.weight.grad.abs().sum() > 0 and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in g.alpha_embedding.parameters())


def test_unet_default_size_is_tens_of_millions_and_the_options_set_it():
    with torch.device("meta"):  # counted without allocating
        sizes = {shape: sum(p.numel() for p in make_generator("unet", shape, num_classes=10).parameters())
                 for shape in [(3, 32, 32), (3, 64, 64)]}
        small = make_generator("unet", (3, 32, 32), width=32, depth=1, num_classes=10)
    assert 20e6 < sizes[(3, 32, 32)] < 60e6 and sizes[(3, 64, 64)] > sizes[(3, 32, 32)]
    assert sum(p.numel() for p in small.parameters()) < sizes[(3, 32, 32)] / 10
    assert small.describe() == "width 32, depth 1, channel multipliers (1,2,2,2)"


def test_unet_refusals_name_the_argument():
    with pytest.raises(ValueError, match=r"square images of side 32 or 64.*\(3, 28, 28\).*--generator conv"):
        make_generator("unet", (3, 28, 28))
    with pytest.raises(ValueError, match="image sample_shape"):
        make_generator("unet", (64,))
    with pytest.raises(ValueError, match="noise_dim"):
        make_generator("unet", (3, 32, 32), noise_dim=16)
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        make_generator("unet", (3, 32, 32), width=0)
    with pytest.raises(ValueError, match="conv generator has no depth"):
        make_generator("conv", (3, 32, 32), depth=2)
    guided = make_generator("unet", (1, 32, 32), width=8, depth=1, guidance=True)
    plain = make_generator("unet", (1, 32, 32), width=8, depth=1)
    noise = sample_noise(guided, 2, _rng())
    with pytest.raises(ValueError, match="alpha .* must be >= 1"):
        guided(noise, alpha=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match=r"alpha must be a number or have shape \(2,\)"):
        guided(noise, alpha=torch.ones(3))
    with pytest.raises(ValueError, match="built without guidance"):
        plain(noise, alpha=2.0)
    with pytest.raises(ValueError, match="unconditional generator"):
        plain(noise, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"noise must have shape \(B, 1024\)"):
        plain(noise[:, :10])


def test_mlp_depth_and_sizes_in_the_log():
    g = make_generator("mlp", (5,), width=16, depth=2)
    assert g.describe() == "hidden 16, depth 2" and len(g.hidden) == 1
    assert make_generator("conv", (1, 8, 8), width=8).describe() == "width 8"
