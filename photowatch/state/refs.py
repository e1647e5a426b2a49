"""Field references of a night: what later frames of a field are measured against.

- the **astrometric** references of a (night, target): used when no catalogue
  is available: the first good frame of each *field* (pointing) of the target,
  its stars with sky positions from its WCS; later frames of that field are
  registered to it (a relative solution). A target observed at two pointings
  that do not overlap (RATIR's ZJ/YH apertures) has two fields;
- the **photometric** references of a (night, target, filter): ``zpref``, the
  zero point of the first absolutely calibrated frame, and ``fluxref``, the
  star fluxes of the first frame measured without a catalogue; every frame's
  FLXSCALE brings it to one of them, and the coadd's MAGZP is ``zpref``'s.

Each is written once, atomically, as an ECSV file under
``OUT/state/refs/<night>/``; the first writer wins, so two workers of a process
cannot set two references.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

from photowatch.core.classify import safe_name
from photowatch.io.fits import write_bytes


class FieldRefs:
    def __init__(self, out: str | Path):
        self.root = Path(out) / "state" / "refs"
        self._cache: dict[Path, object] = {}
        self._guard = threading.RLock()  # near() inside claim_field reads under it

    def _path(self, night: str, target: str, filt: str | None, kind: str) -> Path:
        name = f"{kind}_{safe_name(target)}" + (f"_{safe_name(filt)}" if filt else "")
        return self.root / night / f"{name}.ecsv"

    def get(self, night: str, target: str, filt: str | None, kind: str):
        """The reference table (astropy Table with meta), or None."""
        from astropy.table import Table

        path = self._path(night, target, filt, kind)
        with self._guard:
            if path in self._cache:
                return self._cache[path]
            if not path.exists():
                return None
            table = Table.read(path, format="ascii.ecsv")
            self._cache[path] = table
            return table

    def set_if_absent(self, night: str, target: str, filt: str | None, kind: str, table):
        """Make ``table`` the reference unless one exists; returns the reference in force."""
        path = self._path(night, target, filt, kind)
        with self._guard:
            if path in self._cache:
                return self._cache[path]
            if not path.exists():
                buf = io.StringIO()
                table.write(buf, format="ascii.ecsv")
                write_bytes(path, buf.getvalue().encode())
        existing = self.get(night, target, filt, kind)
        return existing if existing is not None else table

    # -------------------------------------------------------------- per field (pointing)
    def near(self, night: str, target: str, filt: str | None, kind: str, ra: float, dec: float,
             radius_deg: float):
        """The reference of the field whose centre (meta ``ra0``/``dec0``) is nearest to
        (ra, dec) and within ``radius_deg``, or None."""
        import math

        best, best_d = None, radius_deg
        folder = self.root / night
        stem = self._path(night, target, filt, kind).stem
        if not folder.is_dir():
            return None
        for path in sorted(folder.glob(f"{stem}*.ecsv")):
            table = self._read(path)
            ra0, dec0 = table.meta.get("ra0"), table.meta.get("dec0")
            if ra0 is None or dec0 is None:
                continue
            dra = (ra - ra0 + 180.0) % 360.0 - 180.0
            d = math.hypot(dra * math.cos(math.radians(dec)), dec - dec0)
            if d <= best_d:
                best, best_d = table, d
        return best

    def claim_field(self, night: str, target: str, filt: str | None, kind: str, table,
                    ra: float, dec: float, radius_deg: float):
        """Make ``table`` the reference of a new field unless another worker made one near
        (ra, dec) meanwhile; returns ``(reference in force, True if it is ``table``)``.

        Two workers that reach a field's first frames at the same time would otherwise
        each found a field: frames registered to one and flux-scaled against the other
        then share no stars (their relative frames differ by the header pointing errors).
        """
        with self._guard:
            existing = self.near(night, target, filt, kind, ra, dec, radius_deg)
            if existing is not None:
                return existing, False
            return self.add_field(night, target, filt, kind, table), True

    def add_field(self, night: str, target: str, filt: str | None, kind: str, table):
        """Add the reference of a new field (meta ``ra0``/``dec0`` give its centre)."""
        base = self._path(night, target, filt, kind)
        with self._guard:
            n = 1
            while (path := base.with_name(f"{base.stem}_f{n}.ecsv")).exists():
                n += 1
            buf = io.StringIO()
            table.write(buf, format="ascii.ecsv")
            write_bytes(path, buf.getvalue().encode())
            self._cache[path] = table
        return table

    def _read(self, path: Path):
        from astropy.table import Table

        with self._guard:
            if path not in self._cache:
                self._cache[path] = Table.read(path, format="ascii.ecsv")
            return self._cache[path]
