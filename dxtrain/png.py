"""PNG pictures of samples, written with the standard library only.

The trainer saves sample grids (images) and scatter plots (2-D toys) as PNG
files without matplotlib or PIL: :func:`image_grid` and :func:`scatter_image`
turn samples into uint8 pixel arrays, :func:`write_png` encodes them (zlib +
struct, 8-bit grayscale or RGB, written atomically), and :func:`read_png`
decodes such files again (enough PNG for our own files and other simple
8-bit, non-interlaced ones).

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

from dxfield._atomic import atomic_write

__all__ = ["write_png", "read_png", "image_grid", "scatter_image"]

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
