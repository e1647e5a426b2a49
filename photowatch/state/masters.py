"""Masters: incremental updates as calibration frames arrive, selection, final rebuild.

:class:`MasterBook` is the calibration side of the engine. For each
calibration frame it prepares the frame (overscan, trim, gain; darks
bias-subtracted and per second; flats bias/dark-corrected and normalised),
applies the quality cuts, adds it to its master's running accumulator
(O(pixels), no earlier frame re-read), writes a new master version atomically
and records it in the store in the same transaction that marks the frame
``used``. Accumulator state lives in ``OUT/masters/<night>/.state/`` and lists
its inputs, so a restart after kill -9 never adds a frame twice.

Files::

    OUT/masters/<night>/bias_C0.fits               newest version (a hard link)
    OUT/masters/<night>/flat_SDSS-R_C0.fits
    OUT/masters/<night>/versions/bias_C0_v003.fits every version
    OUT/masters/<night>/bpm_C0.fits                bad-pixel mask (at finalize)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from photowatch import __version__
from photowatch.calib.bpm import bad_pixel_mask
from photowatch.calib.combine import RunningMean, clipped_median_stack, robust_level
from photowatch.calib.cuts import judge
from photowatch.calib.ptc import photon_transfer
from photowatch.calib.select import Candidate, is_better, select_master
from photowatch.core.classify import FrameInfo, safe_name
from photowatch.core.config import Settings
from photowatch.core.errors import WaitForMasters
from photowatch.core.frame import MasterImage
from photowatch.core.instruments import Profile
from photowatch.core.logs import get_logger
from photowatch.io.fits import read_raw, save_npz, write_hdul
from photowatch.stages.prepare import Electrons, subtract_masters, to_electrons, trim_slices
from photowatch.state.locking import NamedLocks
from photowatch.state.store import NOT_NULL, Not, contains

KINDS = ("bias", "dark", "flat")
#: reason of frames waiting (``watch``) for their night's gain and read noise to be measured
GAIN_WAIT = "gain and read noise not measured yet"
log = get_logger("photowatch.calib")


@dataclass(frozen=True)
class MasterKey:
    kind: str
    camera: str
    filter: str
    binning: str
    readout: str
    night: str
    target: str = ""

    @classmethod
    def for_frame(cls, kind: str, info: FrameInfo, target: str = "") -> MasterKey:
        return cls(kind, info.camera, (info.filter or "") if kind in ("flat", "sky") else "",
                   info.binning, info.readout, info.night, target)

    @property
    def text(self) -> str:
        return "|".join((self.kind, self.camera, self.filter, self.binning, self.readout,
                         self.target, self.night))

    def slug(self, long: bool = False) -> str:
        parts = [self.kind]
        if self.filter:
            parts.append(safe_name(self.filter))
        if self.target:
            parts.append(safe_name(self.target))
        parts.append(self.camera)
        if long:
            parts.append(self.binning)
            if self.readout:
                parts.append(safe_name(self.readout))
        return "_".join(parts)


@dataclass
class Outcome:
    """What happened to a calibration frame."""

    state: str  #: used | rejected
    reason: str | None
    levels: dict
    candidate: Candidate | None = None


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:  # also for plain assignments (the state cache)
            self.popitem(last=False)

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        return value


def read_master(path: str | Path) -> MasterImage:
    """Read a master file (SCI and ERR extensions) into a MasterImage."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        hdr = hdul[0].header
        data = np.asarray(hdul["SCI"].data, dtype=np.float32)
        err = np.asarray(hdul["ERR"].data, dtype=np.float32)
        return MasterImage(kind=hdr.get("PWKIND", ""), data=data, var=err * err,
                           label=Path(path).name, version=int(hdr.get("VERSION", 0)),
                           provisional=bool(hdr.get("PROVISNL", False)))


def write_master(path: Path, data: np.ndarray, var: np.ndarray, count: np.ndarray | None,
                 header_items: dict) -> Path:
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    for key, value in header_items.items():
        if value is not None:
            primary.header[key] = value
    hdus = [primary,
            fits.ImageHDU(data.astype(np.float32), name="SCI"),
            fits.ImageHDU(np.sqrt(np.maximum(var, 0)).astype(np.float32), name="ERR")]
    if count is not None:
        hdus.append(fits.ImageHDU(count.astype(np.int16), name="NCOMB"))
    return write_hdul(path, fits.HDUList(hdus))


def _link_current(version_path: Path, current: Path) -> None:
    tmp = current.with_name(f".{current.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(version_path, tmp)
    except OSError:
        shutil.copyfile(version_path, tmp)
    os.replace(tmp, current)


#: bytes of prepared inputs a final master rebuild holds in memory (data and variance,
#: float32); inputs beyond it go to scratch files read back by rows
FINAL_INPUTS_IN_MEMORY = 1 << 30


def _rows_from(path: Path, width: int, y0: int, y1: int) -> np.ndarray:
    """Rows y0:y1 of a raw float32 image file of ``width`` columns (a seek, no memory map)."""
    return np.fromfile(path, dtype=np.float32, count=(y1 - y0) * width,
                       offset=y0 * width * 4).reshape(y1 - y0, width)


class MasterBook:
    """Masters of an output directory: updates, selection, bad-pixel masks, final rebuild."""

    def __init__(self, store, out: str | Path, settings: Settings,
                 profile_for: Callable[[str], Profile]):
        self.store = store
        self.out = Path(out)
        self.root = self.out / "masters"
        self.settings = settings
        self.cal = settings.calibration
        self.profile_for = profile_for
        self._locks = NamedLocks()
        self._images = _LRU(8)
        self._images_guard = threading.Lock()
        self._missing: set[str] = set()  # master files found missing (said once each)
        self._bpms = _LRU(4)
        #: accumulators in memory, by state file: (mtime, RunningMean, meta)
        # one accumulator state in memory (the key of the frame just added): four 4k keys
        # held all night cost ~650 MB; a state file reads back in ~0.1 s (issue 23)
        self._states = _LRU(1)
        self._library: list[Candidate] | None = None
        self._library_lock = threading.Lock()
        self._recorded: set = set()

    # ------------------------------------------------------------------ locking
    def lock(self, name: str, night: str):
        """A lock per master key, across threads and processes."""
        return self._locks.hold(name, self.root / night / ".state" / f"{name}.lock")

    # ------------------------------------------------------------------ candidates
    def library(self) -> list[Candidate]:
        """Masters in the configured calibration library folder (read once).

        Published only when complete, under a lock: a second worker thread asking
        meanwhile used to get the half-read (often empty) list and its frame waited for
        masters that were there (seen as a flaky test_generic_styles library test)."""
        with self._library_lock:
            if self._library is None:
                self._library = self._read_library()
        return self._library

    def _read_library(self) -> list[Candidate]:
        found: list[Candidate] = []
        folder = self.settings.paths.calibration_library
        if folder and Path(folder).is_dir():
            from astropy.io import fits

            for path in sorted(Path(folder).rglob("*.fits")):
                try:
                    hdr = fits.getheader(path)
                    found.append(Candidate(
                        kind=hdr["PWKIND"], camera=hdr["CAMERA"],
                        filter=hdr.get("FILTER", "") or "", binning=hdr["BINNING"],
                        readout=hdr.get("READOUT", "") or "", night=hdr["NIGHT"],
                        version=int(hdr.get("VERSION", 0)),
                        ninputs=int(hdr.get("NCOMBINE", 0)),
                        final=bool(hdr.get("FINAL", False)), path=str(path),
                        target=hdr.get("TARGET", "") or ""))
                except Exception as exc:  # a foreign file in the library: say so, go on
                    log.warning("library_file_skipped", file=str(path), error=str(exc),
                                action="not used as a master; the rest of the library is")
        return found

    @staticmethod
    def candidate_from_row(row) -> Candidate:
        return Candidate(kind=row["kind"], camera=row["camera"], filter=row["filter"],
                         binning=row["binning"], readout=row["readout"], night=row["night"],
                         version=row["version"], ninputs=row["ninputs"],
                         final=bool(row["final"]), path=row["path"], obs_time=row["obs_time"],
                         master_id=row["id"], target=row["target"])

    def candidates(self, kind: str, info: FrameInfo) -> list[Candidate]:
        rows = self.store.masters(kind=kind, camera=info.camera, binning=info.binning,
                                  readout=info.readout)
        return [c for c in map(self.candidate_from_row, rows) if self._on_disk(c)] + [
            c for c in self.library() if c.kind == kind]

    def _on_disk(self, cand: Candidate) -> bool:
        """A master the store records but whose file is gone (an OUT folder moved or pruned,
        a store carried to another machine) is not a candidate: frames take the next best
        master or wait, instead of failing on a missing file. Said once per master."""
        if os.path.exists(cand.path):
            return True
        if cand.path not in self._missing:
            self._missing.add(cand.path)
            log.warning("master_missing", file=cand.path, master_id=cand.master_id,
                        problem="recorded in the store but the file is missing",
                        action="not used; frames take the next best master")
        return False

    def select(self, kind: str, info: FrameInfo, target: str = "") -> Candidate | None:
        return select_master(
            self.candidates(kind, info), kind=kind, camera=info.camera, binning=info.binning,
            readout=info.readout, night=info.night, obs_time=info.obs_time,
            filter=info.filter or "", target=target, min_inputs=self.cal.min_inputs,
            max_age_days=self.cal.max_age_days)

    def load(self, cand: Candidate) -> MasterImage:
        def make():
            img = read_master(cand.path)
            return MasterImage(kind=cand.kind, data=img.data, var=img.var,
                               label=Path(cand.path).name, version=cand.version,
                               master_id=cand.master_id, night=cand.night,
                               provisional=cand.provisional(self.cal.min_inputs))
        with self._images_guard:
            return self._images.get_or(cand.path, make)

    def masters_for(self, info: FrameInfo, profile: Profile, kinds: tuple[str, ...] = KINDS
                    ) -> dict[str, tuple[Candidate, MasterImage]]:
        """The masters a frame is reduced with; WaitForMasters if a required one is missing."""
        out = {}
        missing = []
        for kind in kinds:
            if not profile.uses(kind):
                continue
            cand = self.select(kind, info)
            if cand is None:
                if kind in profile.calibrations_required:
                    what = f"{kind} for filter {info.filter}" if kind == "flat" else kind
                    missing.append(f"no master {what}, camera {info.camera}, binning "
                                   f"{info.binning}{', readout ' + info.readout if info.readout else ''}")
                continue
            out[kind] = (cand, self.load(cand))
        if missing:
            raise WaitForMasters("; ".join(missing))
        return out

    def bpm(self, dark: MasterImage | None, flat: MasterImage | None) -> np.ndarray | None:
        key = (dark.label if dark else None, dark.version if dark else None,
               flat.label if flat else None, flat.version if flat else None)
        return self._bpms.get_or(key, lambda: bad_pixel_mask(dark=dark, flat=flat,
                                                             settings=self.cal))

    # ------------------------------------------------------------------ gain, read noise
    def detector_numbers(self, info: FrameInfo) -> FrameInfo:
        """``info`` with gain and read noise measured from the night's biases and flats
        when the profile could not take them from the header (``gain_source`` "measure").

        The first frame of a (night, camera, binning, readout) that needs them measures
        them (photon transfer, :mod:`photowatch.calib.ptc`), records the result in the
        store (meta ``ptc|...`` and an event) and updates the group's frame rows, so
        masters, products and re-reductions all use the measured values. A night without
        two biases and a pair of flats uses the nearest other night's measurement.
        """
        if "measure" not in (info.gain_source, info.read_noise_source):
            if info.gain_source == "header" and self._infers(info.instrument):
                self._compare_once(info)
            return info
        found = self.measurement(info)
        if found is None:
            why = (self.store.get_meta(self._ptc_key(info, info.night)) or {}).get("why", "")
            if self.store.command == "watch":  # the daemon waits for the night's calibrations
                raise WaitForMasters(f"{GAIN_WAIT}: {why}")
            key = f"assumption|{info.instrument}|{info.night}|gain-unmeasured"
            if self.store.get_meta(key) is None:
                self.store.set_meta(key, {"why": why})
                msg = (f"gain and read noise could not be measured ({why}) and no other night "
                       f"has them: {info.gain:g} e-/ADU and {info.read_noise_e:g} e- assumed")
                self.store.event("header_assumption", file=info.raw_name, level="warning",
                                 message=msg, action=f"assumed for night {info.night}")
                log.warning("gain_assumed", file=info.raw_name, night=info.night, problem=msg)
            changes = {}
            if info.gain_source == "measure":
                changes["gain_source"] = "assumed"
            if info.read_noise_source == "measure":
                changes["read_noise_source"] = "assumed"
            return replace(info, **changes)
        night, m = found
        src = "measured" if night == info.night else f"measured {night}"
        memo = (self._ptc_key(info, info.night), night)
        if night != info.night and memo not in self._recorded:
            self._recorded.add(memo)  # the store's frame rows say what is used, once
            self._record_measured(info)
        changes = {}
        if info.gain_source == "measure":
            changes.update(gain=float(m["gain"]), gain_source=src)
        if info.read_noise_source == "measure":
            changes.update(read_noise_e=float(m["read_noise_e"]), read_noise_source=src)
        return replace(info, **changes)

    def _infers(self, instrument: str) -> bool:
        try:
            return bool(self.profile_for(instrument).infer)
        except Exception:
            return False

    def _compare_once(self, info: FrameInfo) -> None:
        """Measure the night's gain and read noise once and compare them with the header's
        (one event; a warning when they differ by more than 10 %)."""
        key = self._ptc_key(info, info.night).replace("ptc|", "ptc-compared|", 1)
        if self.store.get_meta(key) is not None:
            return
        self.store.set_meta(key, {"started": True})
        m = self.store.get_meta(self._ptc_key(info, info.night))
        if m is None:
            with self.lock(f"ptc-{info.camera}-{info.binning}", info.night):
                m = self.store.get_meta(self._ptc_key(info, info.night)) or \
                    self._measure(info, self._ptc_key(info, info.night))
        if not m.get("gain"):
            return
        dg = m["gain"] / info.gain - 1.0
        dr = m["read_noise_e"] / info.read_noise_e - 1.0 if info.read_noise_e else 0.0
        msg = (f"header gain {info.gain:.3f} e-/ADU, measured {m['gain']:.3f} ({dg:+.1%}); "
               f"read noise {info.read_noise_e:.2f} e- ({info.read_noise_source}), measured "
               f"{m['read_noise_e']:.2f} ({dr:+.1%})")
        self.store.set_meta(key, {"header_gain": info.gain, "measured_gain": m["gain"],
                                  "header_read_noise_e": info.read_noise_e,
                                  "measured_read_noise_e": m["read_noise_e"]})
        bad = abs(dg) > 0.10 or abs(dr) > 0.10
        self.store.event("detector_compared", file=info.raw_name,
                         level="warning" if bad else "info", message=msg,
                         action="header values kept" + ("; check the header" if bad else ""))
        (log.warning if bad else log.info)("detector_compared", night=info.night,
                                           camera=info.camera, message=msg)

    def _ptc_key(self, info: FrameInfo, night: str) -> str:
        return f"ptc|{info.instrument}|{info.camera}|{info.binning}|{info.readout}|{night}"

    def measurement(self, info: FrameInfo) -> tuple[str, dict] | None:
        """(night, {gain, read_noise_e, ...}) for a frame's group, measured if need be."""
        key = self._ptc_key(info, info.night)
        m = self.store.get_meta(key)
        if m is not None and not m.get("gain") and m.get("nframes") != self._n_calib(info):
            m = None  # calibration frames arrived since the last try
        if m is None:
            with self.lock(f"ptc-{info.camera}-{info.binning}", info.night):
                m = self.store.get_meta(key)
                if m is None:
                    m = self._measure(info, key)
        if m and m.get("gain"):
            return info.night, m
        prefix = self._ptc_key(info, "")
        others = []
        for mkey, value in self.store.meta_with_prefix(prefix).items():
            night = mkey[len(prefix):]
            if value and value.get("gain") and night != info.night:
                age = abs((datetime.fromisoformat(night) -
                           datetime.fromisoformat(info.night)).days)
                others.append((age, night, value))
        if others:
            _, night, value = min(others)
            return night, value
        return self._measurement_of_master(info)

    def _measurement_of_master(self, info: FrameInfo) -> tuple[str, dict] | None:
        """The measured gain a master of another output directory (the calibration library)
        was made with (RAWGAIN/RAWRDN when GAINSRC says measured)."""
        from astropy.io import fits

        for kind in ("bias", "flat"):
            cand = self.select(kind, info)
            if cand is None or cand.master_id is not None:
                continue
            try:
                hdr = fits.getheader(cand.path)
            except OSError:
                continue
            if str(hdr.get("GAINSRC", "")).startswith("measured") and hdr.get("RAWGAIN"):
                return cand.night, {"gain": float(hdr["RAWGAIN"]),
                                    "read_noise_e": float(hdr.get("RAWRDN", info.read_noise_e))}
        return None

    def _n_calib(self, info: FrameInfo) -> int:
        return self.store.count_frames(instrument=info.instrument, camera=info.camera,
                                       binning=info.binning, readout=info.readout,
                                       night=info.night, kind=("bias", "flat"))

    def _measure(self, info: FrameInfo, key: str) -> dict:
        rows = self.store.frames(
            instrument=info.instrument, camera=info.camera, binning=info.binning,
            readout=info.readout, night=info.night, kind=("bias", "flat"),
            state=Not(("quarantined", "ignored")))
        biases, flats = [], []
        for row in rows:
            if (row["kind"] == "bias" and len(biases) >= 6) or (
                    row["kind"] == "flat" and len(flats) >= 10):
                continue
            finfo = FrameInfo.from_summary(json.loads(row["info_json"]))
            try:
                raw, _ = read_raw(row["path"])
            except Exception:
                continue
            ys, xs = trim_slices(finfo, raw.shape)
            data = raw[ys, xs]  # no overscan taken off: its estimate's noise is not read noise
            if row["kind"] == "bias":
                biases.append(data.astype(np.float32))
            else:
                flats.append((finfo.filter or "", finfo.saturation_adu, data))
        result = None
        if len(biases) >= 2 and flats:
            bias_level = float(np.median(np.mean(np.stack(biases), axis=0)))
            usable = []
            for filt, sat, data in flats:
                level = float(np.median(data)) - bias_level
                if 0 < float(np.median(data)) < 0.7 * sat and level > 0:
                    usable.append((filt, level, data))
            result = photon_transfer(biases, usable)
        value = result.summary() if result else {
            "gain": None, "why": f"{len(biases)} biases and {len(flats)} flats: need two "
                                "biases and two flats of one filter at similar levels"}
        value["night"] = info.night
        value["nframes"] = self._n_calib(info)
        self.store.set_meta(key, value)
        what = (f"gain {value['gain']:.3f} e-/ADU, read noise {value['read_noise_e']:.2f} e- "
                f"from {value['n_bias_pairs']} bias pairs and {value['n_flat_pairs']} flat "
                "pairs" if result else f"gain and read noise not measured: {value['why']}")
        self.store.event("detector_measured", file=info.raw_name,
                         level="info" if result else "warning", message=what,
                         action=f"camera {info.camera} {info.binning}, night {info.night}")
        log.info("detector_measured", night=info.night, camera=info.camera,
                 binning=info.binning, **{k: v for k, v in value.items() if k not in ("gains", "night")})
        if result:
            self._record_measured(info)
        return value

    def _record_measured(self, info: FrameInfo) -> None:
        """Put the measured numbers into the info of the group's frame rows."""
        rows = self.store.frames(instrument=info.instrument, camera=info.camera,
                                 binning=info.binning, readout=info.readout, night=info.night,
                                 info_json=NOT_NULL)
        for row in rows:
            finfo = FrameInfo.from_summary(json.loads(row["info_json"]))
            new = self.detector_numbers(finfo)
            if new is not finfo:
                self.store.update_frame(row["id"], info_json=new.summary())

    # ------------------------------------------------------------------ preparing
    def calibration_data(self, kind: str, el: Electrons, info: FrameInfo,
                         deps: dict[str, tuple[Candidate, MasterImage]]
                         ) -> tuple[np.ndarray, np.ndarray, float | None]:
        """A prepared calibration frame as it is combined (bias e-, dark e-/s, flat normalised).

        Returns (data, variance, level): ``level`` is a flat's central level in
        electrons before normalisation (None for bias and dark).
        """
        if kind == "bias":
            return el.data, np.full(el.data.shape, el.readvar, np.float32), None
        bias = deps.get("bias", (None, None))[1]
        dark = deps.get("dark", (None, None))[1] if kind == "flat" else None
        data, var = subtract_masters(el, info, bias=bias, dark=dark)
        if kind == "dark":
            t = np.float32(info.exptime_s)
            return data / t, var / (t * t), None
        level, _ = robust_level(data)
        norm = level if np.isfinite(level) and level > 0 else 1.0
        inv = np.float32(1.0 / norm)
        return data * inv, var * (inv * inv), level

    def dependencies(self, kind: str, info: FrameInfo, profile: Profile
                     ) -> dict[str, tuple[Candidate, MasterImage]]:
        needs = {"bias": (), "dark": ("bias",), "flat": ("bias", "dark")}[kind]
        return self.masters_for(info, profile, needs)

    # ------------------------------------------------------------------ incremental
    def _state_path(self, key: MasterKey) -> Path:
        return self.root / key.night / ".state" / f"{key.slug(long=True)}.npz"

    def _load_state(self, key: MasterKey) -> tuple[RunningMean | None, dict]:
        """The accumulator of a key: from memory if the file has not changed since, else read."""
        path = self._state_path(key)
        if not path.exists():
            return None, {"inputs": [], "levels": [], "times": []}
        stamp = path.stat().st_mtime_ns
        cached = self._states.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1], json.loads(json.dumps(cached[2]))
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
        meta = json.loads(str(state.pop("meta")))
        acc = RunningMean.from_state(state)
        self._states[path] = (stamp, acc, meta)
        return acc, json.loads(json.dumps(meta))

    def _save_state(self, key: MasterKey, acc: RunningMean, meta: dict) -> None:
        path = self._state_path(key)
        save_npz(path, meta=np.array(json.dumps(meta)), **acc.state())
        self._states[path] = (path.stat().st_mtime_ns, acc, json.loads(json.dumps(meta)))

    def _next_version(self, key: MasterKey) -> int:
        return self.store.next_master_version(
            kind=key.kind, camera=key.camera, filter=key.filter, binning=key.binning,
            readout=key.readout, target=key.target, night=key.night)

    def _master_paths(self, key: MasterKey, version: int) -> tuple[Path, Path]:
        rows = self.store.masters(kind=key.kind, camera=key.camera, filter=key.filter,
                                  target=key.target, night=key.night)
        same = [r for r in rows if r["binning"] == key.binning and r["readout"] == key.readout]
        other = [r for r in rows if not (r["binning"] == key.binning
                                         and r["readout"] == key.readout)]
        if same:  # keep the name the key's first version got
            long = Path(same[0]["path"]).name.startswith(f"{key.slug(long=True)}_v")
        else:  # the first binning/readout of a night gets the plain PhotoPipe-style name
            long = bool(other)
        slug = key.slug(long=long)
        night_dir = self.root / key.night
        return night_dir / f"{slug}.fits", night_dir / "versions" / f"{slug}_v{version:03d}.fits"

    def _publish(self, key: MasterKey, version: int, data, var, count, inputs: list[int],
                 final: bool, method: str, obs_time: str | None,
                 frame_updates: dict | None = None, stats: dict | None = None,
                 info: FrameInfo | None = None) -> Candidate:
        # choosing a name and recording it happen under one lock per name family, so two keys
        # of one kind and camera (another binning or readout) never both take the plain name
        names_lock = self.lock(f"names-{key.kind}-{key.camera}-{safe_name(key.filter or '_')}-"
                               f"{safe_name(key.target or '_')}", key.night)
        with names_lock:
            return self._publish_locked(key, version, data, var, count, inputs, final, method,
                                        obs_time, frame_updates, stats, info)

    def _publish_locked(self, key, version, data, var, count, inputs, final, method, obs_time,
                        frame_updates, stats, info=None) -> Candidate:
        current, versioned = self._master_paths(key, version)
        ninputs = len(inputs)
        provisional = (not final) and ninputs < self.cal.min_inputs
        names = {r["id"]: r["raw_name"] for r in self.store.frames(id=list(inputs))
                 } if inputs else {}
        header = {"PWKIND": key.kind, "CAMERA": key.camera, "FILTER": key.filter or None,
                  "TARGET": key.target or None, "BINNING": key.binning,
                  "READOUT": key.readout or None, "NIGHT": key.night, "VERSION": version,
                  "NCOMBINE": ninputs, "PROVISNL": provisional, "FINAL": final,
                  "METHOD": method, "PWVERS": __version__,
                  "BUNIT": {"bias": "electron", "dark": "electron/s"}.get(key.kind, "1")}
        if info is not None:  # the detector numbers the inputs were prepared with
            header.update({"RAWGAIN": info.gain, "GAINSRC": info.gain_source,
                           "RAWRDN": info.read_noise_e, "RDNSRC": info.read_noise_source})
        for i, fid in enumerate(inputs[:999], 1):
            header[f"IMCMB{i:03d}"] = names.get(fid, str(fid))
        write_master(versioned, data, var, count, header)
        _link_current(versioned, current)
        self.store.add_master(
            kind=key.kind, camera=key.camera, filter=key.filter, binning=key.binning,
            readout=key.readout, target=key.target, night=key.night, version=version,
            ninputs=ninputs, inputs=inputs, path=str(versioned), provisional=provisional,
            final=final, obs_time=obs_time, method=method, stats=stats,
            frame_updates=frame_updates)
        row = self.store.masters(kind=key.kind, camera=key.camera, filter=key.filter,
                                 binning=key.binning, readout=key.readout, target=key.target,
                                 night=key.night, version=version)[0]
        self._prune(key, version)
        return self.candidate_from_row(row)

    def _prune(self, key: MasterKey, version: int) -> None:
        keep = self.cal.keep_versions
        if not keep or version <= keep:
            return
        current, _ = self._master_paths(key, version)
        for old in range(1, version - keep + 1):
            _, path = self._master_paths(key, old)
            used = self.store.count_frames(masters_json=contains(path.name))
            if not used:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def add_frame(self, frame_id: int, info: FrameInfo, raw: np.ndarray, profile: Profile
                  ) -> Outcome:
        """Add one calibration frame to its master (or reject it); returns what happened.

        Raises WaitForMasters when a dark or flat has no bias (or dark) to be corrected with.
        """
        info = self.detector_numbers(info)
        kind = info.kind
        deps = self.dependencies(kind, info, profile)
        el = to_electrons(raw, info, calibration=self.cal, settings=self.settings.stages.prepare)
        data, var, flat_level = self.calibration_data(kind, el, info, deps)
        key = MasterKey.for_frame(kind, info)
        with self.lock(key.slug(long=True), key.night):
            acc, meta = self._load_state(key)
            levels: dict = {}
            if frame_id not in meta["inputs"]:
                verdict = judge(kind, info, data=data, var=var,
                                raw_median_adu=el.raw_median_adu,
                                saturated_fraction=el.saturated_fraction,
                                group_levels=meta["levels"], running=acc, settings=self.cal,
                                flat_filters=profile.flat_filters, flat_level_e=flat_level)
                levels = verdict.levels
                if not verdict.ok:
                    return Outcome("rejected", verdict.reason, levels)
                acc = acc or RunningMean(clip_sigma=self.cal.clip_sigma)
                result = acc.add(data, var)
                levels["clipped_fraction"] = result.clipped_fraction
                meta["inputs"].append(frame_id)
                meta["levels"].append(levels["level"])
                meta["times"].append(info.obs_time.isoformat())
                self._save_state(key, acc, meta)
            mean, mvar, count = acc.estimate()
            if kind == "flat":
                norm, _ = robust_level(mean)
                mean = mean / np.float32(norm)
                mvar = mvar / np.float32(norm * norm)
            version = self._next_version(key)
            used_masters = {k: {"path": Path(c.path).name, "version": c.version}
                            for k, (c, _) in deps.items()}
            cand = self._publish(
                key, version, mean, mvar, count, list(meta["inputs"]), final=False,
                method=f"running {self.cal.clip_sigma:g}-sigma clipped mean",
                obs_time=max(meta["times"]),
                frame_updates={frame_id: {"state": "used", "reason": None,
                                          "qc_json": levels or None,
                                          "masters_json": used_masters, "product": None}},
                stats={"level": float(np.median(mean)), "deps": used_masters}, info=info)
        log.info("master_updated", file=info.raw_name, master=Path(cand.path).name,
                 version=version, ninputs=cand.ninputs, provisional=cand.provisional(
                     self.cal.min_inputs))
        return Outcome("used", None, levels, cand)

    # ------------------------------------------------------------------ staleness
    def mark_stale(self, cand: Candidate) -> int:
        """Mark frames reduced with a worse master of ``cand``'s key as stale."""
        if self.cal.rereduce == "never":
            return 0
        group = dict(night=cand.night, camera=cand.camera, binning=cand.binning,
                     readout=cand.readout, kind="object")
        if cand.kind in ("flat", "sky"):
            group["filter"] = cand.filter
        rows = self.store.frames(state=("reduced", "rejected"), product=NOT_NULL, stale=0,
                                 **group)
        when = self.cal.stale_when if cand.kind != "sky" else [
            w for w in self.cal.stale_when if w != "inputs_doubled"]
        stale = []
        for row in rows:
            used = json.loads(row["masters_json"] or "{}").get(cand.kind)
            if cand.kind == "sky" and used is None and not self.settings.stages.mastersky.enabled:
                continue
            if cand.kind == "sky" and cand.target and row["target"] != cand.target:
                continue
            if is_better(cand, used, min_inputs=self.cal.min_inputs, when=when):
                stale.append(row["id"])
        if not stale:
            return 0
        what = f"{cand.kind} {Path(cand.path).name} v{cand.version}" + (
            " (final)" if cand.final else "")
        return self.store.mark_stale(stale, f"better master: {what}")

    # ------------------------------------------------------------------ final
    def final_masters(self, night: str, progress: Callable[[str], None] | None = None,
                      scratch: Path | None = None) -> list[Candidate]:
        """Rebuild every master of a night from all its accepted frames (idempotent).

        Each master is a sigma-clipped median of its inputs re-prepared with the
        night's final lower masters (bias, then dark, then flat), combined in
        chunks of rows: the prepared inputs held in memory up to
        :data:`FINAL_INPUTS_IN_MEMORY` bytes, the rest in scratch files read back
        by rows, so memory stays bounded.
        """
        made = []
        for kind in KINDS:
            latest = [r for r in self.store.latest_masters(night) if r["kind"] == kind]
            for row in latest:
                if row["final"]:
                    continue
                cand = self._rebuild(row, scratch, progress)
                if cand is not None:
                    made.append(cand)
        return made

    def _rebuild(self, row, scratch: Path | None, progress) -> Candidate | None:
        key = MasterKey(row["kind"], row["camera"], row["filter"], row["binning"],
                        row["readout"], row["night"], row["target"])
        inputs = json.loads(row["inputs_json"] or "[]")
        if not inputs:
            return None
        frames = {r["id"]: r for r in self.store.frames(id=list(inputs))}
        scratch_dir = Path(scratch or (self.out / "tmp")) / f"final-{key.slug(long=True)}"
        scratch_dir.mkdir(parents=True, exist_ok=True)
        files = []
        shape = None
        deps_used: dict = {}
        try:
            with self.lock(key.slug(long=True), key.night):
                jobs = []
                for fid in inputs:
                    frow = frames[fid]
                    info = self.detector_numbers(
                        FrameInfo.from_summary(json.loads(frow["info_json"])))
                    profile = self.profile_for(info.instrument)
                    deps = self.dependencies(key.kind, info, profile)
                    deps_used = {k: {"path": Path(c.path).name, "version": c.version}
                                 for k, (c, _) in deps.items()}
                    jobs.append((fid, frow["path"], info, deps))

                held = [0]  # bytes of inputs held in memory
                budget = threading.Lock()

                def prepare(job):
                    fid, raw_path, info, deps = job
                    raw, _ = read_raw(raw_path)
                    el = to_electrons(raw, info, calibration=self.cal,
                                      settings=self.settings.stages.prepare)
                    data, var, _ = self.calibration_data(key.kind, el, info, deps)
                    data = data.astype(np.float32, copy=False)
                    var = var.astype(np.float32, copy=False)
                    # held in memory while the night's inputs fit FINAL_INPUTS_IN_MEMORY
                    # (the scratch files cost a write and a read-back of every input)
                    with budget:
                        keep = held[0] + data.nbytes + var.nbytes <= FINAL_INPUTS_IN_MEMORY
                        if keep:
                            held[0] += data.nbytes + var.nbytes
                    if keep:
                        return data, var, data.shape
                    dpath, vpath = scratch_dir / f"{fid}.data.f32", scratch_dir / f"{fid}.var.f32"
                    data.tofile(dpath)
                    var.tofile(vpath)
                    return dpath, vpath, data.shape

                # two inputs at a time (numpy and the file reads release the GIL); the
                # masters' images are only read
                with ThreadPoolExecutor(max_workers=2) as pool:
                    for dpath, vpath, plane_shape in pool.map(prepare, jobs):
                        files.append((dpath, vpath))
                        shape = plane_shape
                        if progress:
                            progress(f"{key.slug()} input {len(files)}/{len(inputs)}")
                def read_rows(i, y0, y1):
                    dsrc, vsrc = files[i]
                    if isinstance(dsrc, np.ndarray):
                        return dsrc[y0:y1], vsrc[y0:y1]
                    width = shape[1]
                    return (_rows_from(dsrc, width, y0, y1), _rows_from(vsrc, width, y0, y1))

                data, var, count = clipped_median_stack(
                    len(files), shape, read_rows, clip_sigma=self.cal.final_clip_sigma,
                    chunk_rows=self.cal.final_chunk_rows, workers=2)
                if key.kind == "flat":
                    norm, _ = robust_level(data)
                    data = data / np.float32(norm)
                    var = var / np.float32(norm * norm)
                times = [frames[f]["obs_time"] for f in inputs if frames[f]["obs_time"]]
                cand = self._publish(
                    key, self._next_version(key), data, var, count, inputs, final=True,
                    method=f"{self.cal.final_clip_sigma:g}-sigma clipped median",
                    obs_time=max(times) if times else None,
                    stats={"level": float(np.median(data)), "deps": deps_used}, info=info)
        finally:
            shutil.rmtree(scratch_dir, ignore_errors=True)
        log.info("master_final", master=Path(cand.path).name, ninputs=len(inputs))
        return cand

    def write_bpm(self, night: str, camera: str, binning: str, readout: str,
                  dark: MasterImage | None, flat: MasterImage | None) -> Path | None:
        """Write the camera's bad-pixel mask next to the masters (for people and DS9)."""
        from astropy.io import fits

        bpm = self.bpm(dark, flat)
        if bpm is None:
            return None
        path = self.root / night / f"bpm_{camera}.fits"
        hdr = fits.Header()
        hdr["CAMERA"] = camera
        hdr["BINNING"] = binning
        hdr["NIGHT"] = night
        hdr["MDARK"] = dark.label if dark else ""
        hdr["MFLAT"] = flat.label if flat else ""
        hdr["COMMENT"] = "1 = bad pixel (hot, dead, low or high flat, bad column)"
        return write_hdul(path, fits.HDUList([fits.PrimaryHDU(bpm.astype(np.uint8), hdr)]))
