"""The master-sky state on disk (state/skies): memory-mapped .npy generations behind a
JSON manifest, the same sums as the in-memory accumulator, a crash-safe commit."""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest

from photowatch.core.config import load_settings
from photowatch.io.fits import save_npz
from photowatch.stages.mastersky import SkyAccumulator, SkyPattern
from photowatch.state import skies
from photowatch.state.skies import SkyBook, read_state, write_state


def _pattern(rng, shape, level=1000.0):
    data = (1 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    var = np.full(shape, 1e-4, np.float32) * rng.uniform(0.5, 2, shape).astype(np.float32)
    valid = rng.uniform(size=shape) > 0.1
    data[~valid] = 0
    var[~valid] = 0
    return SkyPattern(data, var, valid, level, ~valid)


@pytest.mark.parametrize("shape", [(37, 53), (2100, 9)])  # one strip, several strips
def test_generations_hold_the_in_memory_sums(tmp_path, shape):
    rng = np.random.default_rng(shape[0])
    manifest = tmp_path / ".state" / "sky_R_cam.json"
    ref = SkyAccumulator()
    for i in range(4):
        pat, pointing = _pattern(rng, shape), (10.0 + i / 60, -5.0)
        write_state(manifest, read_state(manifest), f"f{i}", pat, pointing)
        ref.add(f"f{i}", pat, pointing)
    acc = read_state(manifest)
    assert acc.members == ref.members and acc.pointings == ref.pointings
    for a, b in ((acc.sum, ref.sum), (acc.sumvar, ref.sumvar), (acc.count, ref.count)):
        assert a.dtype == b.dtype and np.array_equal(a, b)  # bit for bit
        assert not a.flags.writeable  # mapped read-only
    # only the last generation is left, and the leave-one-out master is the same
    assert sorted(p.name for p in manifest.parent.glob("*.npy")) == [
        f"sky_R_cam.g4.{n}.npy" for n in ("count", "sum", "sumvar")]
    pat = _pattern(rng, shape)
    m1 = acc.master(exclude="f2", pattern=pat)
    m2 = ref.master(exclude="f2", pattern=pat)
    assert np.array_equal(m1.data, m2.data) and np.array_equal(m1.var, m2.var)
    assert type(m1.data) is np.ndarray


def test_a_crash_before_the_manifest_leaves_the_previous_state(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    manifest = tmp_path / "sky_R_cam.json"
    first = _pattern(rng, (20, 30))
    write_state(manifest, read_state(manifest), "a", first, (1.0, 2.0))

    def boom(*a, **k):
        raise OSError("killed")

    monkeypatch.setattr(skies, "atomic_write", boom)
    with pytest.raises(OSError):
        write_state(manifest, read_state(manifest), "b", _pattern(rng, (20, 30)), (1.1, 2.0))
    acc = read_state(manifest)
    assert acc.members == ["a"] and np.array_equal(acc.sum, first.data)
    monkeypatch.undo()  # the next add writes over the orphaned generation
    write_state(manifest, acc, "b", first, (1.1, 2.0))
    acc = read_state(manifest)
    assert acc.members == ["a", "b"] and np.array_equal(acc.sum, 2 * first.data)


def test_book_reads_the_former_npz_and_adds_once(tmp_path):
    rng = np.random.default_rng(5)
    settings = load_settings(None)
    book = types.SimpleNamespace(root=tmp_path, lock=lambda *a: contextlib.nullcontext())
    sky = SkyBook(book, settings)
    key = types.SimpleNamespace(night="20200129", text="k", slug=lambda long=False: "sky_R_c")
    sky.key = lambda info: key
    old = SkyAccumulator()
    pats = [_pattern(rng, (16, 24)) for _ in range(3)]
    for i, pat in enumerate(pats[:2]):
        old.add(f"f{i}", pat, (float(i), 0.0))
    legacy = tmp_path / "20200129" / ".state" / "sky_R_c.npz"
    save_npz(legacy, fsync=False, **old.state())
    assert sky.members(None) == ["f0", "f1"]
    assert not sky.add("f1", None, pats[1], (1.0, 0.0))  # already in
    assert sky.add("f2", None, pats[2], (2.0, 0.0))
    assert not legacy.exists()  # converted on the first add
    old.add("f2", pats[2], (2.0, 0.0))
    acc = read_state(sky._path(key))
    assert acc.members == old.members and np.array_equal(acc.sum, old.sum)
    assert np.array_equal(acc.count, old.count)


def test_a_reader_whose_generation_went_meanwhile_reads_the_manifest_again(tmp_path,
                                                                          monkeypatch):
    rng = np.random.default_rng(7)
    manifest = tmp_path / "sky_R_cam.json"
    pats = [_pattern(rng, (8, 12)) for _ in range(2)]
    write_state(manifest, read_state(manifest), "a", pats[0], (1.0, 2.0))
    stale = manifest.read_text()  # names generation 1 ...
    write_state(manifest, read_state(manifest), "b", pats[1], (1.1, 2.0))  # ... now gone
    texts = iter([stale])
    real = type(manifest).read_text
    monkeypatch.setattr(type(manifest), "read_text",
                        lambda self, *a, **k: next(texts, None) or real(self, *a, **k))
    acc = read_state(manifest)
    assert acc.members == ["a", "b"] and np.array_equal(acc.sum, pats[0].data + pats[1].data)
