"""dxtrain's data sets (dxtrain/data.py) and pictures (dxtrain/pictures.py); no torch needed.

* every embedded set loads with the documented shape, dtype, range, labels
  and scale, deterministically in ``seed``;
* a user's ``.npz``/``.npy``/``.h5`` file loads with default and explicit
  keys and labels; channels-last images are detected; uint8 and float images
  are scaled as documented; labels are remapped to 0..K-1;
* every malformed input fails with an error naming the file and the problem;
* the stratified train/test split is disjoint, complete and proportional;
* PNG files round-trip exactly through Pillow, are written atomically (a
  failed write leaves the old file), corrupt or non-PNG files are refused;
  grids put the right pixels in place, scatter plots the right colours in the
  right quadrants, drawing nothing for NaN or out-of-window points;
* the known mixture (``"mixture"``): shape, exact normalisation, seed
  determinism with a fixed truth, nearest-mode assignment; its metric
  (``dxtrain.evaluate.mixture_quality``, needs torch to import) scores truth
  samples at the floor and a collapsed generator far worse;
* line charts draw every series and reference line in its colour, with a
  title, axis labels and a legend, at the requested size.
"""

import os

import numpy as np
import pytest
from PIL import Image

from dxtrain.data import EMBEDDED, Dataset, load_dataset, train_test_split
from dxtrain.pictures import (
    PLOT_COLOURS, SCATTER_POINTS, SCATTER_REFERENCE, image_grid, line_plot, read_png, scatter_image, write_png,
)

# --------------------------------------------------------------------------- embedded


def test_digits_embedded():
    ds = load_dataset("digits")
    assert (ds.name, ds.kind, ds.shape, ds.dim, ds.num_classes) == ("digits", "images", (1, 8, 8), 64, 10)
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(10))
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    # pixel / 16 * 2 - 1 of integers 0..16: exactly 17 levels
    levels = np.unique(ds.x)
    np.testing.assert_allclose(levels, np.arange(17) / 16 * 2 - 1, atol=1e-6)
    # every class is well represented (~180 each)
    assert np.bincount(ds.labels).min() > 150


@pytest.mark.parametrize("name, classes", [("moons", 2), ("swissroll", 0), ("checkerboard", 0),
                                           ("gaussians8", 8)])
def test_toys(name, classes):
    ds = load_dataset(name, n=3000, seed=3)
    assert (ds.kind, ds.shape, ds.num_classes, len(ds)) == ("vectors", (2,), classes, 3000)
    assert ds.x.dtype == np.float32 and np.all(np.isfinite(ds.x))
    np.testing.assert_allclose(ds.x.mean(0), 0.0, atol=1e-5)
    assert np.mean(ds.x.astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-4)
    if classes:
        assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(classes))
    else:
        assert ds.labels is None
    same = load_dataset(name, n=3000, seed=3)
    other = load_dataset(name, n=3000, seed=4)
    np.testing.assert_array_equal(ds.x, same.x)
    assert not np.array_equal(ds.x, other.x)


def test_toy_default_size_and_structure():
    assert len(load_dataset("swissroll")) == 20000
    g = load_dataset("gaussians8", n=4000)
    # each label is one tight cluster: its points sit near their own centre
    centres = np.stack([g.x[g.labels == c].mean(0) for c in range(8)])
    radii = np.linalg.norm(centres, axis=1)
    assert radii.std() < 0.05 * radii.mean()
    spread = np.mean([g.x[g.labels == c].std(0).mean() for c in range(8)])
    assert spread < 0.2 * radii.mean()
    m = load_dataset("moons", n=4000)
    assert abs(np.mean(m.labels) - 0.5) < 0.01  # balanced moons


def test_checkerboard_occupies_half_the_squares():
    b = load_dataset("checkerboard", n=20000)
    # undo the scaling: the board is 4 x 4 unit squares, so 16 cells of equal area
    x = b.x.astype(np.float64)
    cells = np.clip(np.floor((x - x.min(0)) / np.ptp(x, axis=0) * 4), 0, 3).astype(int)
    counts = np.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16).reshape(4, 4)
    occupied = counts > 0.5 * 20000 / 8
    assert occupied.sum() == 8
    assert np.all(occupied[:-1] != occupied[1:]) and np.all(occupied[:, :-1] != occupied[:, 1:])


def test_n_subsets_digits():
    ds = load_dataset("digits", n=100, seed=1)
    assert len(ds) == 100 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x, load_dataset("digits", n=100, seed=1).x)


def test_unknown_embedded_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        load_dataset("digitz")
    for name in EMBEDDED:
        assert name in str(err.value)


@pytest.mark.parametrize("n", [0, -5, 2.5])
def test_bad_n(n):
    with pytest.raises(ValueError, match="n="):
        load_dataset("moons", n=n)


def test_n_larger_than_data():
    with pytest.raises(ValueError, match="exceeds the 1797"):
        load_dataset("digits", n=5000)


def test_key_rejected_for_embedded():
    with pytest.raises(ValueError, match="files only"):
        load_dataset("digits", key="x")


# --------------------------------------------------------------------------- files


def test_npz_default_key_and_labels(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 5))
    y = np.repeat([10, 20, 30, 40, 50], 10)
    path = tmp_path / "vecs.npz"
    np.savez(path, x=x, labels=y)
    ds = load_dataset(str(path))
    assert (ds.name, ds.kind, ds.shape, ds.num_classes) == ("vecs", "vectors", (5,), 5)
    np.testing.assert_allclose(ds.x, x.astype(np.float32))  # float vectors are kept as they are
    np.testing.assert_array_equal(ds.labels, y // 10 - 1)
    np.testing.assert_array_equal(ds.label_names, [10, 20, 30, 40, 50])


@pytest.mark.parametrize("stored", ["data", "images", "arr_0"])
def test_npz_fallback_keys(tmp_path, stored):
    path = tmp_path / "f.npz"
    np.savez(path, **{stored: np.ones((4, 3))})
    assert load_dataset(str(path)).x.shape == (4, 3)


def test_npz_explicit_keys_and_y(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, feats=np.zeros((6, 2)), x=np.ones((6, 2)), y=np.array([1, 1, 0, 0, 1, 0]),
             cls=np.array([5, 5, 5, 7, 7, 7]))
    assert load_dataset(str(path)).x[0, 0] == 1.0
    ds = load_dataset(str(path), key="feats", labels_key="cls")
    assert ds.x[0, 0] == 0.0
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(load_dataset(str(path)).labels, [1, 1, 0, 0, 1, 0])  # "y" by default


def test_npz_missing_key_lists_present(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, foo=np.ones((3, 2)), bar=np.ones(3))
    with pytest.raises(ValueError) as err:
        load_dataset(str(path))
    msg = str(err.value)
    assert "f.npz" in msg and "'foo'" in msg and "'bar'" in msg
    with pytest.raises(ValueError, match="under key 'nope'.*'foo'"):
        load_dataset(str(path), key="nope")
    with pytest.raises(ValueError, match="label.*under key 'zzz'"):
        load_dataset(str(path), key="foo", labels_key="zzz")


def test_npy_with_and_without_sibling_labels(tmp_path):
    x = np.random.default_rng(1).uniform(size=(8, 3)).astype(np.float32)
    np.save(tmp_path / "pts.npy", x)
    ds = load_dataset(str(tmp_path / "pts.npy"))
    assert ds.labels is None and ds.num_classes == 0 and ds.name == "pts"
    np.save(tmp_path / "pts.labels.npy", np.array([3, 3, 4, 4, 3, 4, 9, 9]))
    ds = load_dataset(str(tmp_path / "pts.npy"))
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 0, 1, 2, 2])
    assert ds.num_classes == 3
    with pytest.raises(ValueError, match="key="):
        load_dataset(str(tmp_path / "pts.npy"), key="x")


def test_h5_keys_and_labels(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "imgs.h5"
    images = np.random.default_rng(2).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["y"] = np.array([0, 1, 0, 1, 0, 1])
        f.create_group("grp")["other"] = np.zeros((6, 4))
    ds = load_dataset(str(path))
    assert ds.kind == "images" and ds.shape == (1, 8, 8) and ds.num_classes == 2
    np.testing.assert_allclose(ds.x[:, 0], images / 255 * 2 - 1, atol=1e-6)
    assert load_dataset(str(path), key="grp/other").shape == (4,)
    with pytest.raises(ValueError) as err:
        load_dataset(str(path), key="missing")
    assert "'images'" in str(err.value) and "'grp/other'" in str(err.value)
    hdf5 = tmp_path / "v.hdf5"
    with h5py.File(hdf5, "w") as f:
        f["x"] = np.ones((3, 2))
    assert load_dataset(str(hdf5)).shape == (2,)


def _save(tmp_path, x, labels=None, name="d.npz"):
    path = tmp_path / name
    arrays = {"x": x} if labels is None else {"x": x, "labels": labels}
    np.savez(path, **arrays)
    return str(path)


def test_channels_last_detected(tmp_path):
    x = np.random.default_rng(3).uniform(size=(5, 8, 6, 3)).astype(np.float32)
    ds = load_dataset(_save(tmp_path, x))
    assert ds.shape == (3, 8, 6)
    np.testing.assert_allclose(ds.x, np.moveaxis(x, -1, 1) * 2 - 1, atol=1e-6)


def test_channels_first_kept(tmp_path):
    x = np.random.default_rng(3).uniform(size=(5, 3, 8, 6)).astype(np.float32)
    assert load_dataset(_save(tmp_path, x)).shape == (3, 8, 6)
    # last dim 3 but the second is 4 too: not taken as channels-last
    assert load_dataset(_save(tmp_path, np.zeros((2, 4, 5, 3)))).shape == (4, 5, 3)


def test_grayscale_3d_images(tmp_path):
    assert load_dataset(_save(tmp_path, np.zeros((4, 7, 9), np.uint8))).shape == (1, 7, 9)


def test_uint8_scaling(tmp_path):
    x = np.array([0, 51, 255, 128], np.uint8).reshape(1, 1, 2, 2).repeat(3, 0)
    ds = load_dataset(_save(tmp_path, x))
    np.testing.assert_allclose(ds.x[0, 0].ravel(), [-1.0, -0.6, 1.0, 128 / 255 * 2 - 1], atol=1e-6)
    assert "uint8" in ds.preprocessing
    vec = load_dataset(_save(tmp_path, np.array([[0, 255], [255, 0]], np.uint8)))
    np.testing.assert_allclose(vec.x, [[-1, 1], [1, -1]])


def test_float_image_ranges(tmp_path):
    rng = np.random.default_rng(4)
    unit = rng.uniform(0, 1, (4, 1, 5, 5))
    np.testing.assert_allclose(load_dataset(_save(tmp_path, unit)).x, unit * 2 - 1, atol=1e-6)
    signed = rng.uniform(-1, 1, (4, 1, 5, 5))
    np.testing.assert_allclose(load_dataset(_save(tmp_path, signed)).x, signed, atol=1e-6)
    wide = rng.normal(50.0, 7.0, (4, 1, 5, 5))
    ds = load_dataset(_save(tmp_path, wide))
    assert abs(ds.x.mean()) < 1e-5 and ds.x.std() == pytest.approx(1.0, rel=1e-4)
    assert "standardised" in ds.preprocessing
    far = rng.normal(50.0, 7.0, (4, 3))  # vectors are never rescaled
    np.testing.assert_allclose(load_dataset(_save(tmp_path, far)).x, far.astype(np.float32))


def test_float_integral_labels_accepted(tmp_path):
    ds = load_dataset(_save(tmp_path, np.zeros((3, 2)), np.array([2.0, 0.0, 2.0])))
    np.testing.assert_array_equal(ds.labels, [1, 0, 1])


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"data\.csv.*'\.csv'.*\.npz"):
        load_dataset(str(path))


@pytest.mark.parametrize("bad, match", [
    (np.array([[0.0, np.nan]] * 3), "NaN/Inf"),
    (np.array([[0.0, np.inf]] * 3), "NaN/Inf"),
    (np.zeros((0, 4)), "empty"),
    (np.zeros(5), r"shape \(5,\)"),
    (np.zeros((2, 1, 3, 4, 5)), r"shape \(2, 1, 3, 4, 5\)"),
    (np.array([["a", "b"]] * 2), "dtype"),
])
def test_bad_samples(tmp_path, bad, match):
    path = _save(tmp_path, bad)
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(path)
    assert "d.npz" in str(err.value)


@pytest.mark.parametrize("labels, match", [
    (np.array([0, 1]), r"labels have shape \(2,\); expected \(3,\)"),
    (np.array([0.5, 1.0, 2.0]), "labels must be integers"),
    (np.array(["a", "b", "c"]), "labels must be integers"),
    (np.array([0.0, np.nan, 1.0]), "labels must be integers"),
])
def test_bad_labels(tmp_path, labels, match):
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(_save(tmp_path, np.zeros((3, 2)), labels))
    assert "d.npz" in str(err.value)


def test_unreadable_files(tmp_path):
    for name in ("junk.npz", "junk.npy", "junk.h5"):
        (tmp_path / name).write_bytes(b"not really")
        with pytest.raises(ValueError, match=name):
            load_dataset(str(tmp_path / name))


# --------------------------------------------------------------------------- Dataset, split


def test_dataset_validates_itself():
    with pytest.raises(ValueError, match="kind"):
        Dataset("a", np.zeros((2, 2), np.float32), None, "points", 0)
    with pytest.raises(ValueError, match="4 dims"):
        Dataset("a", np.zeros((2, 2), np.float32), None, "images", 0)
    with pytest.raises(ValueError, match="labels shape"):
        Dataset("a", np.zeros((2, 2), np.float32), np.zeros(3, np.int64), "vectors", 1)


def test_stratified_split():
    ds = load_dataset("digits")
    train, test = train_test_split(ds, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == len(ds)
    assert test.num_classes == train.num_classes == 10
    # disjoint and complete: match rows by their bytes (digits has few duplicates, so compare multisets)
    rows = lambda d: sorted(r.tobytes() + l.tobytes() for r, l in zip(d.x, d.labels))  # noqa: E731
    assert sorted(rows(train) + rows(test)) == rows(ds)
    full, held = np.bincount(ds.labels), np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(held - 0.2 * full) <= 1)
    again = train_test_split(ds, test_fraction=0.2, seed=0)[1]
    np.testing.assert_array_equal(again.x, test.x)
    assert not np.array_equal(train_test_split(ds, 0.2, seed=1)[1].x, test.x)


def test_split_keeps_rare_class_on_both_sides():
    ds = Dataset("r", np.arange(22, dtype=np.float32)[:, None], np.array([0] * 20 + [1, 1]), "vectors", 2)
    train, test = train_test_split(ds, test_fraction=0.1)
    assert 1 in train.labels and 1 in test.labels


def test_unlabelled_split_and_subset():
    ds = load_dataset("swissroll", n=1000)
    train, test = train_test_split(ds, test_fraction=0.25, seed=2)
    assert (len(train), len(test)) == (750, 250) and train.labels is None
    together = np.concatenate([train.x, test.x])
    np.testing.assert_array_equal(np.sort(together, axis=0), np.sort(ds.x, axis=0))
    sub = ds.subset([3, 1])
    np.testing.assert_array_equal(sub.x, ds.x[[3, 1]])
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(ds, test_fraction=1.0)


# --------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("shape", [(5, 7), (6, 4, 3)])
def test_png_round_trip(tmp_path, shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "a.png"
    write_png(path, pixels)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L" if len(shape) == 2 else "RGB",
                                                          (shape[1], shape[0]))
    np.testing.assert_array_equal(read_png(path), pixels)
    assert os.listdir(tmp_path) == ["a.png"]  # no temporary file left behind


def test_write_png_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    write_png(path, np.zeros((3, 3), np.uint8))
    before = path.read_bytes()

    def broken_save(self, fh, *args, **kwargs):
        fh.write(b"\x89PNG half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_png(path, np.full((3, 3), 255, np.uint8))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.png"]  # old file intact, no temp file


def test_read_png_other_modes_and_bad_files(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_png(tmp_path / "rgba.png"), rgba)
    palette = Image.fromarray(rgba[:, :, :3]).convert("P")  # a palette PNG reads back as RGB
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_png(tmp_path / "p.png"), np.array(palette.convert("RGB")))
    data = (tmp_path / "rgba.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    with pytest.raises(ValueError, match="not a readable PNG"):
        read_png(tmp_path / "bad.png")
    Image.fromarray(rgba[:, :, :3]).save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png(tmp_path / "a.jpg")


def test_write_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "a.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        write_png(tmp_path / "a.png", np.zeros((4, 4, 2), np.uint8))
    assert os.listdir(tmp_path) == []


def test_image_grid_layout_and_scaling(tmp_path):
    images = np.full((5, 1, 2, 3), -1.0)
    images[1] = 1.0
    images[2, 0, 0, 0] = 0.0
    images[3] = np.nan
    grid = image_grid(images, nrow=3, pad=1, scale=2)
    # 2 rows x 3 cols of 4 x 6 tiles with 1-pixel borders
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1) and grid.dtype == np.uint8
    write_png(tmp_path / "grid.png", grid)
    grid = read_png(tmp_path / "grid.png")  # what the file holds
    tile = lambda i: grid[1 + (i // 3) * 5:1 + (i // 3) * 5 + 4, 1 + (i % 3) * 7:1 + (i % 3) * 7 + 6]  # noqa: E731
    assert np.all(tile(0) == 0) and np.all(tile(1) == 255)
    assert np.all(tile(2)[:2, :2] == 128) and tile(2)[2, 2] == 0  # nearest-neighbour 2x2 block
    assert np.all(tile(3) == 128)  # NaN shows as mid grey
    assert grid[0, 0] == 128 and np.all(tile(5) == 128)  # padding, and the empty last tile
    rgb = np.zeros((4, 3, 2, 2))
    rgb[1, 0] = 1.0  # red
    rgb = image_grid(rgb)
    assert rgb.shape == (2 * 3 + 1, 2 * 3 + 1, 3)
    assert tuple(rgb[1, 1]) == (128, 128, 128) and tuple(rgb[1, 4]) == (255, 128, 128)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        image_grid(np.zeros((4, 2, 2, 2)))


def _solid(picture, colour):
    """Pixels of exactly ``colour`` whose four neighbours are too."""
    m = np.pad(np.all(picture == colour, axis=2), 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def test_scatter_image_colours(tmp_path):
    reference = np.array([[-1.0, -1.0]])  # lower left
    points = np.array([[1.0, -1.0]])  # lower right (the legend, with its own dots, sits upper right)
    picture = scatter_image(points, reference, size=256, lim=2.0, title="t")
    assert picture.shape == (256, 256, 3) and picture.dtype == np.uint8
    # solid dots (blocks of one colour; anti-aliased text has stray pixels of any grey) below the legend
    red, grey = (_solid(picture, colour)[128:] for colour in (SCATTER_POINTS, SCATTER_REFERENCE))
    (red_rows, red_cols), (grey_rows, grey_cols) = np.nonzero(red), np.nonzero(grey)
    assert 0 < red.sum() < 20 and 0 < grey.sum() < 20  # one small dot each
    assert np.mean(red_rows) == np.mean(grey_rows)  # at the same height, y = -1
    assert np.min(red_cols) > np.max(grey_cols) + 50 and np.min(red_cols) > 128 > np.max(grey_cols)
    # NaN and out-of-window points are not drawn: the same picture
    more = np.concatenate([points, [[np.nan, 0.0], [50.0, 0.0]]])
    np.testing.assert_array_equal(scatter_image(more, reference, size=256, lim=2.0, title="t"), picture)
    auto = scatter_image(np.random.default_rng(0).normal(size=(500, 2)))
    assert auto.shape == (512, 512, 3) and np.all(auto[0, 0] == 255)
    assert np.all(auto == SCATTER_POINTS, axis=2).sum() > 500  # the samples, and no reference
    assert not _solid(auto, SCATTER_REFERENCE).any()
    write_png(tmp_path / "s.png", auto)
    np.testing.assert_array_equal(read_png(tmp_path / "s.png"), auto)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        scatter_image(np.zeros((3, 3)))


# --------------------------------------------------------------------------- the known mixture


def test_mixture_embedded_shape_and_truth():
    from dxtrain.data import GaussianMixture, mixture_truth

    ds = load_dataset("mixture", n=3000, seed=5)
    assert (ds.name, ds.kind, ds.shape, ds.num_classes, len(ds)) == ("mixture", "vectors", (32,), 0, 3000)
    assert ds.x.dtype == np.float32 and np.all(np.isfinite(ds.x)) and ds.labels is None
    truth = ds.truth
    assert isinstance(truth, GaussianMixture) and truth is mixture_truth()
    assert (truth.num_modes, truth.dim) == (64, 32)
    w = truth.weights
    assert w.sum() == pytest.approx(1.0) and w.max() / w.min() == pytest.approx(64.0)  # Zipf, 1 / rank
    # exactly centred and unit mean square, from the parameters
    np.testing.assert_allclose(w @ truth.means, 0.0, atol=1e-12)
    second = w @ ((truth.means ** 2).sum(1) + truth.dim * truth.sigmas ** 2) / truth.dim
    assert second == pytest.approx(1.0, rel=1e-12)
    assert np.mean(ds.x.astype(np.float64) ** 2) == pytest.approx(1.0, rel=0.05)
    # every mode is clearly separate: the closest centres are several widths apart
    d = np.sqrt(((truth.means[:, None] - truth.means[None]) ** 2).sum(-1))
    d[np.diag_indices(64)] = np.inf
    assert d.min() > 1.8 * truth.sigmas.max() * np.sqrt(32)  # > 1.8 radii of the widest mode
    assert load_dataset("mixture").x.shape == (60000, 32)


def test_mixture_deterministic_in_seed_truth_fixed():
    a, b, c = (load_dataset("mixture", n=500, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    assert a.truth is c.truth  # the mixture never depends on the seed
    train, test = train_test_split(a, 0.2, seed=0)
    assert train.truth is a.truth and test.truth is a.truth and a.subset([0, 1]).truth is a.truth


def test_mixture_nearest_mode_recovers_the_source():
    from dxtrain.data import mixture_truth

    truth = mixture_truth()
    x, modes = truth.sample(5000, np.random.default_rng(0))
    got, d2 = truth.nearest_mode(x, block=777)
    assert np.mean(got == modes) > 0.999
    assert abs(np.mean(d2 <= 53.49) - 0.99) < 0.01  # chi2(32) 99 % quantile
    counts = np.bincount(modes, minlength=64) / 5000
    assert 0.5 * np.abs(counts - truth.weights).sum() < 0.08
    with pytest.raises(ValueError, match="32"):
        truth.nearest_mode(x[:, :5])


def _mixture_quality():
    pytest.importorskip("torch")  # dxtrain.evaluate imports torch (the metric itself is NumPy)
    from dxtrain.evaluate import mixture_quality

    return mixture_quality


def test_mixture_quality_truth_near_floor_collapse_far():
    from dxtrain.data import mixture_truth

    quality = _mixture_quality()
    truth = mixture_truth()
    kw = dict(n_truth=3000, seed=0)
    good = quality(truth.sample(1500, np.random.default_rng(1))[0], truth, **kw)
    assert abs(good["truth_energy_distance"]) < 0.01 and abs(good["floor"]["truth_energy_distance"]) < 0.01
    assert good["mode_tv"] < 0.12 and good["modes_covered"] >= 60 and good["modes_missed"] <= 1
    assert good["in_mode_fraction"] > 0.97 and 0.7 < good["rare_mode_mass_ratio"] < 1.3
    assert (good["n"], good["n_truth"], good["num_modes"]) == (1500, 3000, 64)
    heavy = int(np.argmax(truth.weights))
    collapsed = truth.means[heavy] + truth.sigmas[heavy] * np.random.default_rng(2).standard_normal((1500, 32))
    bad = quality(collapsed, truth, **kw)
    assert bad["truth_energy_distance"] > 100 * max(good["truth_energy_distance"], 0.01)
    assert bad["modes_covered"] == 1 and bad["modes_missed"] == 63 and bad["rare_mode_mass_ratio"] == 0.0
    assert bad["mode_tv"] == pytest.approx(1 - truth.weights[heavy], abs=1e-9)
    assert bad["in_mode_fraction"] > 0.97  # precise but collapsed: the other scores say so
    blurred = quality(collapsed * 0 + np.random.default_rng(3).standard_normal((1500, 32)), truth, **kw)
    assert blurred["in_mode_fraction"] < 0.05 and blurred["truth_energy_distance"] > good["truth_energy_distance"]
    # deterministic, and the reference is shared (cached) between calls
    assert quality(collapsed, truth, **kw) == bad


def test_mixture_quality_rejects_bad_input():
    from dxtrain.data import mixture_truth

    quality = _mixture_quality()
    truth = mixture_truth()
    with pytest.raises(ValueError, match="32"):
        quality(np.zeros((10, 3)), truth)
    with pytest.raises(ValueError, match="n_truth"):
        quality(np.zeros((10, 32)), truth, n_truth=1)
    with pytest.raises(ValueError, match="NaN"):
        quality(np.full((10, 32), np.nan), truth)


def test_evaluate_samples_scores_mixture_against_truth():
    pytest.importorskip("torch")
    from dxtrain.evaluate import evaluate_samples

    train, test = train_test_split(load_dataset("mixture", n=3000), 0.2, seed=0)
    report = evaluate_samples(test.x[:400], train, test, seed=0)
    for key in ("truth_energy_distance", "mode_tv", "modes_covered", "modes_missed", "in_mode_fraction",
                "rare_mode_mass_ratio"):
        assert key in report and key in report["floor"]
    assert abs(report["truth_energy_distance"]) < 0.05
    moons_train, moons_test = train_test_split(load_dataset("moons", n=500), 0.2)
    assert "truth_energy_distance" not in evaluate_samples(moons_test.x, moons_train, moons_test)


def test_line_plot_draws_series_and_reference_lines(tmp_path):
    red, blue, green = (200, 0, 0), (0, 0, 200), (0, 150, 0)
    falling = {"x": [1, 10, 100], "y": [1.0, 0.1, 0.01], "label": "falling", "colour": red}
    kw = {"xlabel": "seconds", "ylabel": "score", "logx": True, "logy": True, "size": (400, 300)}
    pic = line_plot([falling, {"x": [1, 100], "y": [0.5, float("nan")], "colour": blue}],
                    hlines=[{"y": 0.05, "label": "target", "colour": green}], title="t", **kw)
    assert pic.shape == (300, 400, 3) and pic.dtype == np.uint8
    for colour in (red, blue, green):
        assert np.all(pic == colour, axis=2).sum() > 0, colour
    assert np.all(pic == red, axis=2).sum() > 200  # a line, not just markers
    assert np.mean(np.any(pic != 255, axis=2)) > 0.05  # not blank: frame, ticks, text
    write_png(tmp_path / "plot.png", pic)
    np.testing.assert_array_equal(read_png(tmp_path / "plot.png"), pic)
    # the title, the axis labels and the legend are drawn (as text)
    for changed in ({"title": ""}, {"xlabel": ""}, {"ylabel": ""}):
        other = line_plot([falling], **{**kw, "title": "t", **changed})
        assert not np.array_equal(other, line_plot([falling], **kw, title="t")), changed
    assert not np.array_equal(line_plot([falling], **kw), line_plot([{**falling, "label": ""}], **kw))
    # default colours, linear axes, points that a log axis cannot show are skipped
    pic = line_plot([{"x": [0, 1, 2], "y": [-1, 0, 1]}], size=(300, 200))
    assert pic.shape == (200, 300, 3)
    linear = np.all(pic == PLOT_COLOURS[0], axis=2).sum()
    pic = line_plot([{"x": [0, 1, 2], "y": [-1, 0, 1]}], size=(300, 200), logy=True)
    assert 0 < np.all(pic == PLOT_COLOURS[0], axis=2).sum() < linear / 3  # only the marker at y=1
    # many labels: the legend is drawn inside, the picture keeps its size
    crowded = [{"x": np.linspace(0, 1, 50), "y": np.linspace(0, 1, 50) * s, "label": f"s{s}"} for s in (1, -1)]
    crowded += [{"x": [0, 1], "y": [0.9, 0.9]}, {"x": [0, 1], "y": [-0.9, -0.9]}]
    assert line_plot(crowded, size=(300, 200)).shape == (200, 300, 3)
    with pytest.raises(ValueError, match="ylim"):
        line_plot([{"x": [1], "y": [1]}], ylim=(1, 0))
    with pytest.raises(ValueError, match="values"):
        line_plot([{"x": [1, 2], "y": [1]}])
    with pytest.raises(ValueError, match="size"):
        line_plot([], size=(10, 10))
