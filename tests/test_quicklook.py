"""PNG previews: block averaging, stretches, masks, atomic writes, no pyplot state."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from photowatch.io.previews import NODATA_RGB, block_average, preview, save_png


def test_block_average_ignores_masked_and_nan_pixels():
    a = np.arange(36, dtype=np.float32).reshape(6, 6)
    a[0, 0] = np.nan
    mask = np.zeros((6, 6), np.uint16)
    mask[0, 1] = 4
    out = block_average(a, 3, mask)
    assert out.shape == (2, 2)
    assert out[0, 0] == pytest.approx(np.mean([2, 6, 7, 8, 12, 13, 14]))
    assert out[1, 1] == pytest.approx(a[3:, 3:].mean())
    # padding: a 7x5 image in blocks of 3 gives 3x2, partial blocks average what they have
    odd = block_average(np.ones((7, 5)), 3)
    assert odd.shape == (3, 2) and np.all(odd == 1)
    assert np.isnan(block_average(np.full((4, 4), np.nan), 2)).all()
    x = np.random.default_rng(2).random((8, 12)).astype(np.float32)  # the fast path
    assert np.allclose(block_average(x, 4), x.reshape(2, 4, 3, 4).mean(axis=(1, 3)))


def test_preview_shape_orientation_and_nodata_colour():
    img = np.zeros((300, 200), np.float32)
    img[:150] = 1.0  # bottom half bright (rows 0..149)
    img[:, :20] = np.nan  # a no-data strip on the left
    rgb = preview(img, max_size=100, stretch="zscale")
    assert rgb.shape == (100, 67, 3) and rgb.dtype == np.uint8
    nodata = np.round(np.array(NODATA_RGB) * 255).astype(np.uint8)
    assert np.all(rgb[:, 0] == nodata)
    assert rgb[10, 40, 0] > rgb[90, 40, 0]  # row 0 is the bottom: bright stays low
    assert preview(img, stretch="asinh").shape == (300, 200, 3)
    with pytest.raises(ValueError, match="stretch"):
        preview(img, stretch="log")


def test_save_png_writes_a_readable_png(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, (512, 640)).astype(np.float32)
    mask = np.zeros(img.shape, np.uint16)
    mask[:, 100:110] = 1
    path = save_png(img, tmp_path / "q" / "frame.png", mask=mask, max_size=256,
                    title="20200129T021605C0o  SDSS-R  300 s", fsync=False)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = imread(path)
    # block factor ceil(640 / 256) = 3: 214 x 171, plus the title band
    assert png.shape[1] == 214 and png.shape[0] == 171 + 22
    plain = imread(save_png(img, tmp_path / "plain.png", fsync=False))
    assert plain.shape[:2] == (512, 640)
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic: no temporary left behind


def test_save_png_of_a_4k_image_is_a_1024_px_preview(tmp_path):
    # its cost is measured in benchmarks/bench_previews.py, not asserted here
    img = np.random.default_rng(1).normal(0, 1, (4096, 4096)).astype(np.float32)
    save_png(img, tmp_path / "big.png", title="coadd", fsync=False)
    png = imread(tmp_path / "big.png")
    assert png.shape[1] == 1024 and png.shape[0] == 1024 + 22  # 4x4 blocks, title band


def test_no_pyplot_state():
    code = ("import sys, numpy as np, tempfile, os\n"
            "from photowatch.io.previews import save_png\n"
            "d = tempfile.mkdtemp()\n"
            "save_png(np.ones((50, 50)), os.path.join(d, 'a.png'), title='t', fsync=False)\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
