"""How many neural processors (NPs) each Akida layer needs, from its shape, and whether the device has them.

akida's mapper gives a layer's NPs only after quantizeml and cnn2snn have built the model; lint must answer
from the ONNX graph alone. The rule below was measured with ``map(device, hw_only=True,
mode=MapMode.Minimal)`` on one-layer akida models (akida 2.19.3, IP v2; docs/akida.md has the tables) and
is checked against real ``map()`` results in tests/akida/test_device_fit.py and test_lint_reality.py.

A Conv2D layer is cut two ways, and needs ``filter_groups * tiles`` CNP1 units:

- **filters**: each CNP holds ``WEIGHT_BYTES`` (51200) of weights, in 25-byte words of 24 8-bit weights.
  A 1x1 kernel packs 24 filters of one input channel per word; a KxK kernel (K = 3, 5, 7) packs 8 filters
  in ``WORDS_PER_CHANNEL[K]`` words per input channel (3, 10, 28). So one CNP takes ``24 * floor(2048 /
  Cin)`` 1x1 filters, or ``8 * floor(51200 / (25 * Cin * WORDS_PER_CHANNEL[K]))`` KxK filters, at most 512;
  when not even 8 fit, the layer cannot map at all ("Filter size is too big to fit in a CNP").
- **space**: each CNP holds ``INPUT_BYTES`` (65536) of input, one byte per pixel and channel. A map that
  does not fit, or is higher than ``TILE_ROWS`` = 64 rows (akida's x, the ONNX H), is cut into a grid of
  tiles of at most 64 rows and ``TILE_COLUMNS`` = 256 columns; a tile carries the K - 1 rows and columns
  its kernel reads beyond it (half of that at the edge of a cut in two). The grid is the smallest that
  fits.

A depthwise layer splits channels instead of filters: ``ceil(H / 64)`` row strips, each holding as many
whole channels as fit in 65536 bytes. A dense layer takes one FNP; Add and Concatenate take none (they ride
on skip DMAs); the input convolution runs on the HRC. Stride and padding do not change the count (tiles
are cut on the input). The estimate is never above akida's count, is exact on at least 95 % of the conv
shapes measured and at most 17 % low on the others (akida's tile grid is then a little larger than the
smallest); filter groups and depthwise counts matched on every shape measured.

akida spreads layers that do not fit beside each other over passes and sequences, so a layer outside
residual blocks falls to software only when it alone needs more CNPs than the device has ("Not enough
hardware components of type CNP1 available"); a skip connection cannot be cut, which rules.py's AKM204
accounts for.
"""

from __future__ import annotations

import dataclasses
import functools
import math

# Per-NP memories of an IP v2 mesh (akida.NP.SramSize_v2) and the tile limits of a CNP
# (akida.MapConstraints: cnp_max_width applies to akida's first dimension, the ONNX H; cnp_max_height to
# the ONNX W; cnp_max_filters).
INPUT_BYTES = 65536
WEIGHT_BYTES = 51200
WORD_BYTES = 25  # one weight word: 24 8-bit weights
TILE_ROWS = 64
TILE_COLUMNS = 256
MAX_FILTERS_PER_CNP = 512
# Weight words per input channel for a block of 8 filters, per square kernel size (measured).
WORDS_PER_CHANNEL = {3: 3, 5: 10, 7: 28}
FILTER_BLOCK = 8
POINTWISE_FILTERS_PER_WORD = 24


@dataclasses.dataclass(frozen=True)
class Need:
    """The CNPs one layer needs: ``count``, how they were counted, the filters (or depthwise channels) one
    CNP holds (0 when not even one block of filters fits a CNP's weight memory) and the tiles (row strips
    for a depthwise layer) its input is cut into."""

    count: int
    how: str
    filters_per_np: int = 0
    tiles: int = 1


def filters_per_cnp(in_channels: int, kernel: int) -> int:
    """How many filters of a ``kernel`` x ``kernel`` convolution (``kernel`` 1 or a key of
    ``WORDS_PER_CHANNEL``) over ``in_channels`` one CNP holds; 0 when not even one block fits."""

    if kernel == 1:
        per_np = POINTWISE_FILTERS_PER_WORD * (WEIGHT_BYTES // WORD_BYTES // in_channels)
    else:
        per_np = FILTER_BLOCK * (WEIGHT_BYTES // (WORD_BYTES * in_channels * WORDS_PER_CHANNEL[kernel]))
    return min(per_np, MAX_FILTERS_PER_CNP)


def _extent(length: int, parts: int, kernel: int) -> int:
    """Rows (or columns) of one of ``parts`` tiles of ``length``, with the halo its kernel reads."""

    if parts == 1:
        return length
    halo = kernel - 1 if parts >= 3 else (kernel - 1) // 2
    return math.ceil(length / parts) + halo


@functools.lru_cache(maxsize=4096)
def conv_tiles(height: int, width: int, in_channels: int, kernel: int) -> int:
    """The number of tiles a convolution's ``height`` x ``width`` x ``in_channels`` input is cut into."""

    if height <= TILE_ROWS and height * width * in_channels <= INPUT_BYTES:
        return 1
    best = height * width  # one pixel per tile: an upper bound
    for rows in range(1, height + 1):
        tile_height = _extent(height, rows, kernel)
        if tile_height > TILE_ROWS:
            continue
        if rows >= best:
            break
        for columns in range(1, width + 1):
            tile_width = _extent(width, columns, kernel)
            if tile_width <= TILE_COLUMNS and tile_width * tile_height * in_channels <= INPUT_BYTES:
                best = min(best, columns * rows)
                break
    return best


def conv_need(height: int, width: int, in_channels: int, filters: int, kernel: int) -> Need | None:
    """CNPs for a Conv2D layer with a square ``kernel`` (after the input layer); None for a kernel size
    that was not measured (only 1, 3, 5 and 7 were)."""

    if kernel != 1 and kernel not in WORDS_PER_CHANNEL:
        return None
    per_np = filters_per_cnp(in_channels, kernel)
    tiles = conv_tiles(height, width, in_channels, kernel)
    if per_np == 0:
        return Need(0, f"a {kernel}x{kernel} filter over {in_channels} channels exceeds a CNP's weight memory",
                    0, tiles)
    groups = math.ceil(filters / per_np)
    how = (f"{groups} group(s) of at most {per_np} of its {filters} {kernel}x{kernel} filters over {in_channels} "
           f"channels x {tiles} tile(s) of its {height}x{width} input")
    return Need(groups * tiles, how, per_np, tiles)


def depthwise_need(height: int, width: int, channels: int) -> Need:
    """CNPs for a DepthwiseConv2D layer: row strips of at most 64, channels split to fit the input memory."""

    strips = math.ceil(height / TILE_ROWS)
    strip_height = _extent(height, strips, 3)
    per_np = max(1, INPUT_BYTES // (strip_height * width))
    groups = math.ceil(channels / per_np)
    how = f"{strips} strip(s) x {groups} group(s) of at most {per_np} of its {channels} channels at {height}x{width}"
    return Need(strips * groups, how, per_np, strips)


@functools.lru_cache(maxsize=16)
def device_units(device: str) -> tuple[int, int]:
    """(CNP1 units, all NPs) of the named virtual device, read from akida's mesh."""

    import akida

    from qanac.backends.akida.devices import device_spec

    mesh = getattr(akida, device_spec(device).factory)().mesh
    return sum(1 for np in mesh.nps if akida.NP.Type.CNP1 in np.types), len(mesh.nps)


def devices_with(cnps: int, ip_version: str = "v2") -> list[str]:
    """The virtual devices of ``ip_version`` with at least ``cnps`` CNP1 units, smallest first."""

    from qanac.backends.akida.devices import VIRTUAL_DEVICES

    names = [n for n, s in VIRTUAL_DEVICES.items() if s.ip_version == ip_version]
    return sorted((n for n in names if device_units(n)[0] >= cnps), key=lambda n: device_units(n)[1])
