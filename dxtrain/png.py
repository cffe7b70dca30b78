"""PNG pictures of samples, written with the standard library only.

The trainer saves sample grids (images) and scatter plots (2-D toys) as PNG
files without matplotlib or PIL: :func:`image_grid` and :func:`scatter_image`
turn samples into uint8 pixel arrays, :func:`line_plot` draws labelled line
charts (the benchmarks' curves; a built-in 3x5 pixel font for the text),
:func:`write_png` encodes them (zlib + struct, 8-bit grayscale or RGB,
written atomically), and :func:`read_png` decodes such files again (enough
PNG for our own files and other simple 8-bit, non-interlaced ones).

Example
-------
>>> from dxtrain.data import load_dataset
>>> grid = image_grid(load_dataset("digits").x[:64], scale=4)
>>> write_png("digits.png", grid)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from dxfield.atomic import atomic_write

__all__ = ["write_png", "read_png", "image_grid", "scatter_image", "line_plot", "draw_text"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> channels: gray, RGB, gray+alpha, RGBA

GRID_PAD_VALUE = 128  # mid grey: visible against black and white backgrounds alike
SCATTER_BACKGROUND = (255, 255, 255)
SCATTER_AXES = (232, 232, 232)
SCATTER_REFERENCE = (190, 190, 190)
SCATTER_POINTS = (214, 39, 40)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_png(path, pixels: np.ndarray) -> None:
    """Write uint8 ``(H, W)`` grayscale or ``(H, W, 3)`` RGB pixels to ``path``.

    The file is written next to ``path`` under a temporary name and moved into
    place with :func:`os.replace`, so a reader never sees half a file.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels dtype {pixels.dtype}: expected uint8 (use image_grid/scatter_image to convert)")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"pixels shape {pixels.shape}: expected (H, W) grayscale or (H, W, 3) RGB")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"pixels shape {pixels.shape}: the image is empty")
    color_type = 0 if pixels.ndim == 2 else 2
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter byte 0 (None) per row
    data = (PNG_SIGNATURE
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + _chunk(b"IEND", b""))

    atomic_write(path, lambda fh: fh.write(data), "wb")


def read_png(path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced PNG into uint8 ``(H, W)`` or ``(H, W, C)``.

    Handles what :func:`write_png` writes plus the other 8-bit colour types
    (gray+alpha, RGBA) and all five row filters; checks every chunk's CRC.
    Palette images, other bit depths and interlacing raise ``ValueError``.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path!r} is not a PNG file (bad signature)")
    pos, header, idat = len(PNG_SIGNATURE), None, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        payload = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length] or b"\0\0\0\0")
        if len(payload) != length or crc != zlib.crc32(kind + payload):
            raise ValueError(f"{path!r}: chunk {kind!r} is truncated or fails its CRC")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError(f"{path!r}: missing IHDR or IDAT chunk")
    width, height, depth, color_type, _, _, interlace = header
    if depth != 8 or color_type not in _COLOR_TYPES or interlace != 0:
        raise ValueError(f"{path!r}: unsupported PNG (bit depth {depth}, colour type {color_type}, "
                         f"interlace {interlace}); read_png handles 8-bit non-interlaced gray/RGB/alpha")
    channels = _COLOR_TYPES[color_type]
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    if raw.size != height * (stride + 1):
        raise ValueError(f"{path!r}: image data has {raw.size} bytes, expected {height * (stride + 1)}")
    raw = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for r in range(height):
        out[r] = _unfilter(raw[r, 0], raw[r, 1:].astype(np.int32), prev, channels, path)
        prev = out[r].astype(np.int32)
    return out.reshape(height, width) if channels == 1 else out.reshape(height, width, channels)


def _unfilter(ftype, line, prev, bpp, path):
    if ftype == 0:
        return line
    if ftype == 2:
        return (line + prev) & 0xFF
    out = line.copy()
    if ftype == 1:  # Sub: a running sum per channel
        for c in range(bpp):
            out[c::bpp] = np.cumsum(line[c::bpp]) & 0xFF
        return out
    if ftype not in (3, 4):
        raise ValueError(f"{path!r}: unknown PNG row filter {ftype}")
    for i in range(len(out)):  # Average and Paeth depend on the pixel just decoded
        left = out[i - bpp] if i >= bpp else 0
        if ftype == 3:
            out[i] = (line[i] + (left + prev[i]) // 2) & 0xFF
        else:
            up_left = prev[i - bpp] if i >= bpp else 0
            p = left + prev[i] - up_left
            pa, pb, pc = abs(p - left), abs(p - prev[i]), abs(p - up_left)
            pred = left if pa <= pb and pa <= pc else (prev[i] if pb <= pc else up_left)
            out[i] = (line[i] + pred) & 0xFF
    return out


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` -> ``0..255``; out-of-range values clip, NaN shows as mid grey."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.round((np.clip(values, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` in ``[-1, 1]`` into one uint8 picture.

    Parameters
    ----------
    images : array (N, C, H, W) with C = 1 or 3, or (N, H, W) grayscale
        Values outside ``[-1, 1]`` are clipped; NaN shows as mid grey.
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
    n, channels, height, width = images.shape
    ncol = int(np.ceil(np.sqrt(n))) if nrow is None else int(nrow)
    if ncol < 1:
        raise ValueError(f"nrow={nrow!r}: expected a positive integer")
    nrows = -(-n // ncol)
    tiles = _to_uint8(images).transpose(0, 2, 3, 1)  # N, H, W, C
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    th, tw = height * scale, width * scale
    grid = np.full((nrows * (th + pad) + pad, ncol * (tw + pad) + pad, channels), GRID_PAD_VALUE, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (th + pad), pad + c * (tw + pad)
        grid[top:top + th, left:left + tw] = tiles[i]
    return grid[:, :, 0] if channels == 1 else grid


def scatter_image(points: np.ndarray, reference: np.ndarray | None = None, size: int = 512,
                  lim: float | None = None) -> np.ndarray:
    """Rasterise 2-D points into a ``(size, size, 3)`` uint8 RGB picture.

    ``reference`` (the real data) is drawn first in light grey, ``points`` (the
    samples) on top in red, each as a small square dot, over faint axes.
    The window is ``[-lim, lim]`` on both axes; by default ``lim`` covers 99.5 %
    of the reference (of the points when there is no reference) with a 15 %
    margin, so a few far-off samples do not shrink the picture. Points
    outside the window or not finite are not drawn. ``y`` points up.
    """
    points = _points_2d(points, "points")
    reference = None if reference is None else _points_2d(reference, "reference")
    if int(size) != size or size < 8:
        raise ValueError(f"size={size!r}: expected an integer >= 8")
    size = int(size)
    if lim is None:
        frame = reference if reference is not None else points
        frame = np.abs(frame[np.all(np.isfinite(frame), axis=1)])
        lim = 1.15 * float(np.quantile(frame, 0.995)) if frame.size else 1.0
        lim = lim if lim > 0 else 1.0
    elif not (np.isfinite(lim) and lim > 0):
        raise ValueError(f"lim={lim!r}: expected a positive number")

    picture = np.empty((size, size, 3), np.uint8)
    picture[:] = SCATTER_BACKGROUND
    centre = int(round((size - 1) / 2))
    picture[centre, :] = SCATTER_AXES
    picture[:, centre] = SCATTER_AXES
    radius = max(1, size // 512)
    for pts, colour in ((reference, SCATTER_REFERENCE), (points, SCATTER_POINTS)):
        if pts is None:
            continue
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        cols = np.round((pts[:, 0] + lim) / (2 * lim) * (size - 1))
        rows = np.round((lim - pts[:, 1]) / (2 * lim) * (size - 1))
        inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
        rows, cols = rows[inside].astype(np.int64), cols[inside].astype(np.int64)
        for dr in range(-radius, radius + 1):
            for dc in range(-radius, radius + 1):
                r, c = rows + dr, cols + dc
                ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
                picture[r[ok], c[ok]] = colour
    return picture


def _numpy(values):
    if hasattr(values, "detach"):  # a torch tensor, wherever it lives
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _points_2d(points, name):
    points = _numpy(points).astype(np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} shape {points.shape}: expected (N, 2) points")
    return points


# --------------------------------------------------------------------------- line plots

# A 3x5 pixel font: digits, capitals (lower case is drawn as upper case) and the punctuation
# tick labels and titles need; anything else is drawn as "?".
_FONT_ROWS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# .## ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# ..# .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###",
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### #.# #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# #.# ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    " ": "... ... ... ... ...", ".": "... ... ... ... .#.", ",": "... ... ... .#. #..",
    "-": "... ... ### ... ...", "+": "... .#. ### .#. ...", "_": "... ... ... ... ###",
    "=": "... ### ... ### ...", ":": "... .#. ... .#. ...", ";": "... .#. ... .#. #..", "(": "..# .#. .#. .#. ..#",
    ")": "#.. .#. .#. .#. #..", "[": "##. #.. #.. #.. ##.", "]": ".## ..# ..# ..# .##",
    "/": "..# ..# .#. #.. #..", "%": "#.# ..# .#. #.. #.#", "<": "..# .#. #.. .#. ..#",
    ">": "#.. .#. ..# .#. #..", "?": "### ..# .#. ... .#.", "'": ".#. .#. ... ... ...",
    "*": "#.# .#. #.# ... ...", "|": ".#. .#. .#. .#. .#.", "~": "... .## ##. ... ...",
}
_FONT = {ch: np.array([[c == "#" for c in row] for row in rows.split()], bool) for ch, rows in _FONT_ROWS.items()}

PLOT_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PLOT_TEXT = (40, 40, 40)
PLOT_GRID = (225, 225, 225)
PLOT_FRAME = (120, 120, 120)


def text_size(text: str, scale: int = 2) -> tuple[int, int]:
    """Width and height in pixels of ``text`` drawn by :func:`draw_text`."""
    return max(0, 4 * len(text) - 1) * scale, 5 * scale


def draw_text(picture: np.ndarray, x: int, y: int, text: str, colour=PLOT_TEXT, scale: int = 2) -> None:
    """Draw ``text`` into an ``(H, W, 3)`` uint8 picture, top-left corner at column ``x``, row ``y``.

    The built-in font is 3x5 pixels per character (one column of spacing), magnified ``scale``
    times; lower case is drawn as upper case. Pixels outside the picture are skipped.
    """
    h, w = picture.shape[:2]
    for i, ch in enumerate(str(text).upper()):
        glyph = _FONT.get(ch, _FONT["?"])
        rows, cols = np.nonzero(np.kron(glyph, np.ones((scale, scale), bool)))
        rows, cols = rows + y, cols + x + 4 * scale * i
        ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        picture[rows[ok], cols[ok]] = colour


def _nice_step(span: float, target: int = 6) -> float:
    raw = span / max(target, 1)
    mag = 10.0 ** np.floor(np.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * mag:
            return m * mag
    return 10.0 * mag


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        lo_e, hi_e = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
        mults = (1,) if hi_e - lo_e > 4 else ((1, 2, 5) if hi_e - lo_e > 1 else (1, 2, 3, 5))
        ticks = [m * 10.0 ** e for e in range(lo_e, hi_e + 1) for m in mults]
    else:
        step = _nice_step(hi - lo)
        ticks = list(np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step))
    return [float(t) for t in ticks if lo - 1e-12 * abs(lo) <= t <= hi + 1e-12 * abs(hi)]


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    text = f"{v:.3g}"
    return text.replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def _stroke(picture, xs, ys, colour, width: int, dash: int, box) -> None:
    """A polyline through pixel coordinates ``xs``, ``ys`` (floats), clipped to ``box`` = (x0, y0, x1, y1)."""
    pts_x, pts_y, along = [], [], []
    run = 0.0
    for i in range(len(xs) - 1):
        dx, dy = xs[i + 1] - xs[i], ys[i + 1] - ys[i]
        length = float(np.hypot(dx, dy))
        n = max(2, int(np.ceil(length * 2)) + 1)
        t = np.linspace(0.0, 1.0, n)
        pts_x.append(xs[i] + t * dx)
        pts_y.append(ys[i] + t * dy)
        along.append(run + t * length)
        run += length
    if not pts_x:
        return
    px, py, s = np.concatenate(pts_x), np.concatenate(pts_y), np.concatenate(along)
    if dash:
        keep = (s // dash) % 2 == 0
        px, py = px[keep], py[keep]
    _dots(picture, px, py, colour, width, box)


def _dots(picture, px, py, colour, size: int, box) -> None:
    x0, y0, x1, y1 = box
    cx, cy = np.round(px).astype(np.int64), np.round(py).astype(np.int64)
    lo = -(size // 2)
    for dy in range(lo, lo + size):
        for dx in range(lo, lo + size):
            c, r = cx + dx, cy + dy
            ok = (c >= x0) & (c <= x1) & (r >= y0) & (r <= y1)
            picture[r[ok], c[ok]] = colour


def line_plot(series, *, title: str = "", xlabel: str = "", ylabel: str = "", size=(900, 560),
              logx: bool = False, logy: bool = False, hlines=(), xlim=None, ylim=None) -> np.ndarray:
    """Draw a line chart; returns uint8 ``(H, W, 3)`` pixels for :func:`write_png`.

    The legend (the labelled series and reference lines) goes in a corner of the plot area
    where it hides nothing, or else in a band added below the chart (``H`` then exceeds
    ``size[1]``).

    Parameters
    ----------
    series : list of dict
        Each ``{"x": [...], "y": [...]}`` with optional ``"label"`` (shown in the legend),
        ``"colour"`` (RGB; default: a fixed palette in order), ``"dash"`` (pixels per dash,
        0 for solid), ``"width"`` (line width in pixels, default 2) and ``"markers"``
        (default True: a square at every point). Points with a non-finite coordinate (or
        not positive on a log axis) are skipped; the line joins the remaining points.
    title, xlabel, ylabel : str
        Drawn in the built-in 3x5 pixel font (see :func:`draw_text`).
    size : (width, height)
    logx, logy : bool
        Logarithmic axes (ticks at 1, 2, 5 times powers of ten, or powers of ten alone
        for wide ranges).
    hlines : list of dict
        Horizontal reference lines ``{"y": value}`` with optional ``"label"``, ``"colour"``,
        ``"dash"`` (default 6).
    xlim, ylim : (low, high), optional
        Axis ranges; by default the data's (and the reference lines') range plus a margin.
    """
    width, height = (int(v) for v in size)
    if width < 200 or height < 150:
        raise ValueError(f"size={size!r}: expected at least (200, 150) pixels")
    series = list(series)
    hlines = list(hlines)

    def clean(x, y):
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"a series has {x.size} x values but {y.size} y values")
        ok = np.isfinite(x) & np.isfinite(y)
        if logx:
            ok &= x > 0
        if logy:
            ok &= y > 0
        return x[ok], y[ok]

    data = [clean(s["x"], s["y"]) for s in series]
    href = [float(h["y"]) for h in hlines if np.isfinite(h["y"]) and (not logy or h["y"] > 0)]
    all_x = np.concatenate([d[0] for d in data] + [np.zeros(0)])
    all_y = np.concatenate([d[1] for d in data] + [np.asarray(href, np.float64)])

    def span(values, lim, log, name):
        if lim is not None:
            lo, hi = (float(v) for v in lim)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi and (not log or lo > 0)):
                raise ValueError(f"{name}={lim!r}: expected (low, high) with low < high"
                                 + (" and low > 0 on a log axis" if log else ""))
            return lo, hi
        if values.size == 0:
            return (1.0, 10.0) if log else (0.0, 1.0)
        lo, hi = float(values.min()), float(values.max())
        if log:
            lo, hi = np.log10(lo), np.log10(hi)
        pad = 0.05 * (hi - lo) if hi > lo else (0.5 if log else max(abs(lo) * 0.1, 0.5))
        lo, hi = lo - pad, hi + pad
        return (10.0 ** lo, 10.0 ** hi) if log else (lo, hi)

    (xlo, xhi), (ylo, yhi) = span(all_x, xlim, logx, "xlim"), span(all_y, ylim, logy, "ylim")
    fx = np.log10 if logx else (lambda v: np.asarray(v, np.float64))
    fy = np.log10 if logy else (lambda v: np.asarray(v, np.float64))

    scale = 2
    yticks = _ticks(ylo, yhi, logy)
    label_w = max([text_size(_tick_label(t), scale)[0] for t in yticks] + [0])
    left, right = label_w + 22, width - 16
    top, bottom = (44 if title else 20) + (16 if ylabel else 0), height - (52 if xlabel else 32)
    box = (left, top, right, bottom)

    def to_px(x, y):
        px = left + (fx(x) - fx(xlo)) / (fx(xhi) - fx(xlo)) * (right - left)
        py = bottom - (fy(y) - fy(ylo)) / (fy(yhi) - fy(ylo)) * (bottom - top)
        return px, py

    picture = np.empty((height, width, 3), np.uint8)
    picture[:] = SCATTER_BACKGROUND
    for t in yticks:
        _, py = to_px(xlo, t)
        picture[int(round(py)), left:right + 1] = PLOT_GRID
        tw, th = text_size(_tick_label(t), scale)
        draw_text(picture, left - 8 - tw, int(round(py)) - th // 2, _tick_label(t), scale=scale)
    xticks = _ticks(xlo, xhi, logx)
    last_end = -10 ** 9
    for t in xticks:
        px, _ = to_px(t, ylo)
        picture[top:bottom + 1, int(round(px))] = PLOT_GRID
        tw, _ = text_size(_tick_label(t), scale)
        start = int(round(px)) - tw // 2
        if start > last_end + 6:  # skip labels that would overlap the previous one
            draw_text(picture, start, bottom + 8, _tick_label(t), scale=scale)
            last_end = start + tw
    picture[top, left:right + 1] = PLOT_FRAME
    picture[bottom, left:right + 1] = PLOT_FRAME
    picture[top:bottom + 1, left] = PLOT_FRAME
    picture[top:bottom + 1, right] = PLOT_FRAME

    legend = []
    for i, h in enumerate(hlines):
        if not (np.isfinite(h["y"]) and (not logy or h["y"] > 0)):
            continue
        colour = tuple(h.get("colour", PLOT_FRAME))
        _, py = to_px(xlo, h["y"])
        _stroke(picture, np.array([left, right], float), np.array([py, py]), colour, 1, int(h.get("dash", 6)), box)
        if h.get("label"):
            legend.append((h["label"], colour, int(h.get("dash", 6)), 1))
    for i, (s, (x, y)) in enumerate(zip(series, data)):
        colour = tuple(s.get("colour", PLOT_COLOURS[i % len(PLOT_COLOURS)]))
        w = int(s.get("width", 2))
        if x.size:
            px, py = to_px(x, y)
            _stroke(picture, px, py, colour, w, int(s.get("dash", 0)), box)
            if s.get("markers", True):
                _dots(picture, px, py, colour, w + 3, box)
        if s.get("label"):
            legend.append((s["label"], colour, int(s.get("dash", 0)), w))

    if legend:
        lw = max(text_size(t, scale)[0] for t, *_ in legend) + 44
        lh = 16 * len(legend) + 6
        # inside, in a corner of the plot area that hides no drawn pixel; else in a band below the picture
        drawn = np.any(picture != np.array(SCATTER_BACKGROUND, np.uint8), axis=2) \
            & np.any(picture != np.array(PLOT_GRID, np.uint8), axis=2)
        corners = [(right - lw - 8, top + 8), (right - lw - 8, bottom - lh - 4), (left + 14, bottom - lh - 4),
                   (left + 14, top + 8)]
        free = [c for c in corners if c[0] - 6 > left and c[1] - 4 > top
                and not drawn[c[1] - 4:c[1] + lh - 4, c[0] - 6:c[0] + lw + 2].any()]
        if free:
            x0, y0 = free[0]
            picture[y0 - 4:y0 + lh - 4, x0 - 6:x0 + lw + 2] = SCATTER_BACKGROUND
        else:
            band = np.empty((lh + 8, width, 3), np.uint8)
            band[:] = SCATTER_BACKGROUND
            picture = np.concatenate([picture, band])
            x0, y0 = left, height + 6
        for j, (text, colour, dash, w) in enumerate(legend):
            yy = y0 + 16 * j + 5
            _stroke(picture, np.array([x0, x0 + 28], float), np.array([yy, yy], float), colour, max(w, 2),
                    min(dash, 6), (0, 0, picture.shape[1] - 1, picture.shape[0] - 1))
            draw_text(picture, x0 + 36, yy - 5, text, scale=scale)
    if title:
        tw, _ = text_size(title, scale)
        draw_text(picture, max(4, (width - tw) // 2), 10, title, scale=scale)
    if ylabel:
        draw_text(picture, 8, top - 20, ylabel, scale=scale)
    if xlabel:
        tw, _ = text_size(xlabel, scale)
        draw_text(picture, left + (right - left - tw) // 2, height - 20, xlabel, scale=scale)
    return picture
