"""Master selection: the best master of a kind for a frame (one function, pure).

Candidates must have the frame's camera, binning and readout mode (and filter
for flats, target for per-target skies). Preference, best first:

1. the frame's night, final;
2. the frame's night, newest version with at least ``min_inputs`` inputs;
3. another night (this output directory or the calibration library), the
   nearest in time within ``max_age_days``, final before non-final;
4. the frame's night, newest provisional version (fewer inputs than
   ``min_inputs``): used only when nothing better exists, and the product says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Candidate:
    """A master version that could serve (a store row or a library file)."""

    kind: str
    camera: str
    filter: str
    binning: str
    readout: str
    night: str
    version: int
    ninputs: int
    final: bool
    path: str
    obs_time: str | None = None
    master_id: int | None = None  #: None for library files
    target: str = ""

    @property
    def key(self) -> str:
        return "|".join((self.kind, self.camera, self.filter, self.binning, self.readout,
                         self.target, self.night))

    def provisional(self, min_inputs: int) -> bool:
        return not self.final and self.ninputs < min_inputs


def _night_time(c: Candidate) -> datetime:
    """Every version of a night's master is dated at that night's local midnight (UTC+0)."""
    return datetime.fromisoformat(c.night + "T00:00:00+00:00") + timedelta(days=1)


def select_master(candidates: list[Candidate], *, kind: str, camera: str, binning: str,
                  readout: str, night: str, obs_time: datetime, filter: str = "",
                  target: str = "", min_inputs: int = 3, max_age_days: float = 30.0
                  ) -> Candidate | None:
    """The best candidate for a frame, or None (see the module docstring)."""
    fits = [c for c in candidates
            if c.kind == kind and c.camera == camera and c.binning == binning
            and c.readout == readout and (kind not in ("flat", "sky") or c.filter == filter)
            and (kind != "sky" or c.target == target)]
    if not fits:
        return None
    tonight = [c for c in fits if c.night == night]
    finals = [c for c in tonight if c.final]
    if finals:
        return max(finals, key=lambda c: c.version)
    good = [c for c in tonight if not c.provisional(min_inputs)]
    if good:
        return max(good, key=lambda c: c.version)
    others = []
    for c in fits:
        if c.night == night or c.provisional(min_inputs):
            continue
        age = abs((_night_time(c) - obs_time).total_seconds()) / 86400.0
        if age <= max_age_days:
            others.append((age, not c.final, -c.version, c))
    if others:
        # nearest night first; within a night final first, then the newest version
        return min(others, key=lambda o: (o[0], o[1], o[2]))[3]
    if tonight:
        return max(tonight, key=lambda c: c.version)
    return None


def is_better(new: Candidate, used: dict | None, *, min_inputs: int, when: list[str]) -> bool:
    """Whether ``new`` is materially better than the master a frame was reduced with.

    ``used`` is what the frame recorded (keys: key, night, ninputs, final,
    provisional), or None when the frame was reduced without this kind.
    ``when`` lists the rules that count: ``first_nonprovisional``,
    ``inputs_doubled``, ``final``.
    """
    if used is None:
        return not new.provisional(min_inputs)
    if used.get("master_id") == new.master_id and new.master_id is not None:
        return False
    if used.get("final"):
        return False
    if "final" in when and new.final:
        return True
    new_prov = new.provisional(min_inputs)
    if "first_nonprovisional" in when and not new_prov and (
            used.get("provisional") or used.get("night") != new.night):
        return True
    return bool("inputs_doubled" in when and used.get("night") == new.night
                and new.ninputs >= 2 * max(1, int(used.get("ninputs") or 1)))
