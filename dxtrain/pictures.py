"""Pictures of samples and curves, written as PNG files.

The trainer saves sample grids (images) and scatter plots (2-D toys); the
benchmarks draw line charts. :func:`image_grid` tiles images into uint8
pixels with Pillow; :func:`scatter_image` and :func:`line_plot` draw with
matplotlib (its Agg canvas, never pyplot's global state) and return the
rendered pixels; :func:`write_png` saves pixels with Pillow, atomically
(:func:`dxfield.atomic.atomic_write`), and :func:`read_png` reads any PNG
back into a NumPy array.

Example
-------
>>> from dxtrain.data import load_dataset
>>> grid = image_grid(load_dataset("digits").x[:64], scale=4)
>>> write_png("digits.png", grid)  # doctest: +SKIP
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from PIL import Image

from dxfield.atomic import atomic_write

__all__ = ["write_png", "read_png", "image_grid", "scatter_image", "line_plot", "PLOT_COLOURS"]

GRID_PAD_VALUE = 128  # mid grey: visible against black and white backgrounds alike
SCATTER_AXES = (200, 200, 200)
SCATTER_REFERENCE = (190, 190, 190)
SCATTER_POINTS = (214, 39, 40)
PLOT_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PLOT_REFERENCE = (120, 120, 120)  # default colour of the horizontal reference lines

DPI = 128  # a power of two: width / DPI * DPI is exact, so Agg draws exactly the pixels asked for
POINT = 72.0 / DPI  # typographic points per pixel (matplotlib sizes lines, markers and fonts in points)
FONT = {"tick": 7.5, "label": 8.5, "title": 9.5, "legend": 7.5}  # points


# --------------------------------------------------------------------------- files


def write_png(path, pixels: np.ndarray) -> None:
    """Write uint8 ``(H, W)`` grayscale or ``(H, W, 3)`` RGB pixels to ``path`` as a PNG file.

    Encoded by Pillow into a temporary file next to ``path`` that is moved
    into place (:func:`dxfield.atomic.atomic_write`), so a reader never sees
    half a file.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels dtype {pixels.dtype}: expected uint8 (use image_grid/scatter_image to convert)")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"pixels shape {pixels.shape}: expected (H, W) grayscale or (H, W, 3) RGB")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"pixels shape {pixels.shape}: the image is empty")
    image = Image.fromarray(np.ascontiguousarray(pixels))
    atomic_write(path, lambda fh: image.save(fh, format="PNG"), "wb")


def read_png(path) -> np.ndarray:
    """Decode a PNG file (with Pillow) into uint8 ``(H, W)``, ``(H, W, 2)``, ``(H, W, 3)`` or ``(H, W, 4)``.

    Grayscale, gray+alpha, RGB and RGBA come back as they are stored;
    palette images are expanded to RGB (RGBA when they have transparency),
    other modes (16-bit, 1-bit) are converted to 8-bit grayscale or RGB.
    A file that is not a readable PNG raises ``ValueError``.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"{path!r} is a {image.format} file, not a PNG")
            image.load()
            if image.mode not in ("L", "LA", "RGB", "RGBA"):
                alpha = "transparency" in image.info or image.mode.endswith("A")
                image = image.convert("RGBA" if alpha else ("L" if image.mode in ("1", "I", "I;16") else "RGB"))
            return np.array(image)
    except (OSError, SyntaxError) as exc:  # Pillow: unidentified, truncated or corrupt (e.g. a bad CRC)
        raise ValueError(f"{path!r} is not a readable PNG file: {exc}") from exc


# --------------------------------------------------------------------------- image grids


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` -> ``0..255``; out-of-range values clip, NaN shows as mid grey."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.round((np.clip(values, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` in ``[-1, 1]`` into one uint8 picture (with Pillow).

    Parameters
    ----------
    images : array (N, C, H, W) with C = 1 or 3, or (N, H, W) grayscale
        NumPy or torch. Values outside ``[-1, 1]`` are clipped; NaN shows as mid grey.
    nrow : int, optional
        Images per row (default ``ceil(sqrt(N))``).
    pad : int
        Pixels of mid-grey border around and between the tiles.
    scale : int
        Nearest-neighbour upscaling factor of each image.

    Returns
    -------
    numpy.ndarray
        uint8 ``(rows, cols)`` for grayscale, ``(rows, cols, 3)`` for RGB;
        ready for :func:`write_png`.
    """
    images = _numpy(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images shape {images.shape}: expected (N, C, H, W) with N >= 1 and C = 1 or 3")
    for arg, value, low in (("pad", pad, 0), ("scale", scale, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{arg}={value!r}: expected an integer >= {low}")
    pad, scale = int(pad), int(scale)
    n, channels, height, width = images.shape
    ncol = int(np.ceil(np.sqrt(n))) if nrow is None else int(nrow)
    if ncol < 1:
        raise ValueError(f"nrow={nrow!r}: expected a positive integer")
    nrows = -(-n // ncol)
    th, tw = height * scale, width * scale
    mode, background = ("L", GRID_PAD_VALUE) if channels == 1 else ("RGB", (GRID_PAD_VALUE,) * 3)
    grid = Image.new(mode, (ncol * (tw + pad) + pad, nrows * (th + pad) + pad), background)
    for i, tile in enumerate(_to_uint8(images).transpose(0, 2, 3, 1)):  # N, H, W, C
        r, c = divmod(i, ncol)
        tile = Image.fromarray(np.ascontiguousarray(tile[:, :, 0] if channels == 1 else tile), mode)
        grid.paste(tile.resize((tw, th), Image.Resampling.NEAREST), (pad + c * (tw + pad), pad + r * (th + pad)))
    return np.array(grid)


def _numpy(values):
    if hasattr(values, "detach"):  # a torch tensor, wherever it lives
        values = values.detach().cpu().numpy()
    return np.asarray(values)


# --------------------------------------------------------------------------- matplotlib figures


def _figure(width: int, height: int):
    """A matplotlib figure of exactly ``width`` x ``height`` pixels on an Agg canvas, and its axes."""
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _pixels(fig) -> np.ndarray:
    """Render ``fig`` and return its uint8 ``(H, W, 3)`` RGB pixels."""
    fig.canvas.draw()
    return np.array(fig.canvas.buffer_rgba())[:, :, :3]


def _rgb(colour) -> tuple:
    """A 0..255 RGB triple as matplotlib's 0..1 colour."""
    return tuple(float(c) / 255.0 for c in colour)


def _style(ax, title: str, xlabel: str, ylabel: str, **legend) -> None:
    """Title, axis labels, tick labels, a light grid and (when anything is labelled) a legend."""
    ax.set_title(title, fontsize=FONT["title"])
    ax.set_xlabel(xlabel, fontsize=FONT["label"])
    ax.set_ylabel(ylabel, fontsize=FONT["label"])
    ax.tick_params(which="both", labelsize=FONT["tick"])
    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() == "log":
            _log_ticks(axis, lo, hi)
    ax.grid(True, which="major", color=_rgb((225, 225, 225)), linewidth=0.6)
    ax.set_axisbelow(True)
    if ax.get_legend_handles_labels()[0]:  # labels starting with "_" are not listed
        ax.legend(**{"loc": "best", "fontsize": FONT["legend"], "framealpha": 0.9, **legend})


def _log_ticks(axis, lo: float, hi: float) -> None:
    """Labelled ticks at 1, 2, 5 (1, 2, 3, 5 on a narrow range; 1 on a wide one) times powers of ten,
    written as plain numbers (20, 0.05; 1e-05 when very small)."""
    decades = np.log10(hi / lo)
    subs = (1.0,) if decades > 4 else ((1.0, 2.0, 5.0) if decades > 1 else (1.0, 2.0, 3.0, 5.0))
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _points_2d(points, name):
    points = _numpy(points).astype(np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} shape {points.shape}: expected (N, 2) points")
    return points[np.all(np.isfinite(points), axis=1)]


def scatter_image(points: np.ndarray, reference: np.ndarray | None = None, size: int = 512,
                  lim: float | None = None, title: str | None = None) -> np.ndarray:
    """Draw 2-D points as a ``(size, size, 3)`` uint8 RGB scatter plot (matplotlib).

    ``reference`` (the real data) is drawn first in light grey, ``points`` (the
    samples) on top in red, as small square dots, on square axes with a
    legend and a title (default: the number of samples). The window is
    ``[-lim, lim]`` on both axes; by default ``lim`` covers 99.5 % of the
    reference (of the points when there is no reference) with a 15 % margin,
    so a few far-off samples do not shrink the picture. Points outside the
    window or not finite are not drawn. ``y`` points up.
    """
    points = _points_2d(points, "points")
    reference = None if reference is None else _points_2d(reference, "reference")
    if int(size) != size or size < 8:
        raise ValueError(f"size={size!r}: expected an integer >= 8")
    if lim is None:
        frame = np.abs(reference if reference is not None else points)
        lim = 1.15 * float(np.quantile(frame, 0.995)) if frame.size else 1.0
        lim = lim if lim > 0 else 1.0
    elif not (np.isfinite(lim) and lim > 0):
        raise ValueError(f"lim={lim!r}: expected a positive number")

    fig, ax = _figure(int(size), int(size))
    dot = (max(3.0, size / 170) * POINT) ** 2  # marker area in points^2: a dot 3 pixels (more on big pictures) wide
    ax.axhline(0.0, color=_rgb(SCATTER_AXES), linewidth=0.6, zorder=0)
    ax.axvline(0.0, color=_rgb(SCATTER_AXES), linewidth=0.6, zorder=0)
    for pts, colour, label in ((reference, SCATTER_REFERENCE, "data"), (points, SCATTER_POINTS, "samples")):
        if pts is not None:
            ax.scatter(pts[:, 0], pts[:, 1], s=dot, marker="s", color=_rgb(colour), linewidths=0,
                       label=label, rasterized=True)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    _style(ax, f"{len(points)} samples" if title is None else title, "x[0]", "x[1]",
           loc="upper right", markerscale=2.0)
    return _pixels(fig)


# --------------------------------------------------------------------------- line charts


def _clean(x, y, logx: bool, logy: bool):
    """Float arrays of the points a chart can show: finite, and positive on a log axis."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a series has {x.size} x values but {y.size} y values")
    ok = np.isfinite(x) & np.isfinite(y)
    if logx:
        ok &= x > 0
    if logy:
        ok &= y > 0
    return x[ok], y[ok]


def _check_lim(lim, log: bool, name: str):
    if lim is None:
        return None
    lo, hi = (float(v) for v in lim)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi and (not log or lo > 0)):
        raise ValueError(f"{name}={lim!r}: expected (low, high) with low < high"
                         + (" and low > 0 on a log axis" if log else ""))
    return lo, hi


def _dashes(dash: float, width_px: float):
    """matplotlib line style for dashes ``dash`` pixels long (0: solid)."""
    if not dash:
        return "-"
    return (0, (dash / width_px, dash / width_px))  # matplotlib scales dash lengths by the line width


def line_plot(series, *, title: str = "", xlabel: str = "", ylabel: str = "", size=(900, 560),
              logx: bool = False, logy: bool = False, hlines=(), xlim=None, ylim=None) -> np.ndarray:
    """Draw a line chart with matplotlib; returns uint8 ``(H, W, 3)`` pixels for :func:`write_png`.

    Parameters
    ----------
    series : list of dict
        Each ``{"x": [...], "y": [...]}`` with optional ``"label"`` (shown in the legend),
        ``"colour"`` (RGB 0..255; default: :data:`PLOT_COLOURS` in order), ``"dash"`` (pixels
        per dash, 0 for solid), ``"width"`` (line width in pixels, default 2) and ``"markers"``
        (default True: a square at every point). Points with a non-finite coordinate (or
        not positive on a log axis) are skipped; the line joins the remaining points.
    title, xlabel, ylabel : str
    size : (width, height)
        In pixels, at least (200, 150); the picture has exactly this size, the legend
        goes where it hides the least.
    logx, logy : bool
        Logarithmic axes.
    hlines : list of dict
        Horizontal reference lines ``{"y": value}`` with optional ``"label"``, ``"colour"``,
        ``"dash"`` (default 6).
    xlim, ylim : (low, high), optional
        Axis ranges; by default the data's (and the reference lines') range plus a margin.
    """
    width, height = (int(v) for v in size)
    if width < 200 or height < 150:
        raise ValueError(f"size={size!r}: expected at least (200, 150) pixels")
    xlim, ylim = _check_lim(xlim, logx, "xlim"), _check_lim(ylim, logy, "ylim")
    data = [_clean(s["x"], s["y"], logx, logy) for s in series]

    fig, ax = _figure(width, height)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    for h in hlines:
        y = float(h["y"])
        if np.isfinite(y) and (not logy or y > 0):
            ax.axhline(y, color=_rgb(h.get("colour", PLOT_REFERENCE)), linewidth=1.2 * POINT,
                       linestyle=_dashes(h.get("dash", 6), 1.2), label=h.get("label") or "_nolegend_")
    for i, (s, (x, y)) in enumerate(zip(series, data)):
        w = float(s.get("width", 2))
        ax.plot(x, y, color=_rgb(s.get("colour", PLOT_COLOURS[i % len(PLOT_COLOURS)])), linewidth=w * POINT,
                linestyle=_dashes(s.get("dash", 0), w), marker="s" if s.get("markers", True) else None,
                markersize=(w + 3) * POINT, markeredgewidth=0, label=s.get("label") or "_nolegend_")
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    _style(ax, title, xlabel, ylabel)
    return _pixels(fig)
