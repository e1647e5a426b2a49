"""The night report: a static page an observer reads at 5 am, and the same facts as JSON.

``OUT/report/<night>/``::

    index.html   one self-contained page (inline CSS, a few lines of inline JS to
                 sort tables, PNG plots and thumbnails; no external assets), opens
                 from the file system without a server
    night.json   the same facts for machines: every frame of the night with its state
    img/         conditions and latency plots, master and coadd thumbnails and previews,
                 and ``cache.json`` (what each image was made from)

The report is a view of the store: it reads, never writes, the store. It is
refreshed during the night (``final=False``, a QUICK-LOOK page that reloads
itself) and written once more by ``finalize`` (``final=True``). A refresh when
nothing changed reads the store and writes the two text files only: each
image is remade only when what it shows changed (the source FITS/PNG's mtime
and size for thumbnails, a hash of the plotted values for plots).

Three steps, one module each: :mod:`~photowatch.report.facts` (the store's facts,
which are ``night.json``), :mod:`~photowatch.report.plots` (the images) and
:mod:`~photowatch.report.render` (the page, from ``report/templates/*.html.j2``).
Links are relative to the report folder and are written only for files that
exist, so the page works when ``OUT`` is copied elsewhere as a whole.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from photowatch.io.fits import write_bytes
from photowatch.report.facts import arrived_as_a_batch as _arrived_as_a_batch
from photowatch.report.facts import collect_facts, software_versions
from photowatch.report.plots import filter_colours, fits_previews, make_images, png_thumbnail
from photowatch.report.render import render_html, settings_toml

#: one report writer at a time in a process (the engine's workers may all ask for one)
_WRITE_LOCK = threading.Lock()


def write_report(out: Path, store, night: str, settings, *, final: bool) -> Path:
    """Write ``OUT/report/<night>/index.html``, ``night.json`` and ``img/`` (atomically).

    Parameters
    ----------
    out
        the output directory (``OUT``)
    store
        the :class:`~photowatch.state.store.Store` of ``OUT`` (only read)
    night
        the night label, ``YYYY-MM-DD``
    settings
        the :class:`~photowatch.core.config.Settings` in use (shown in the report)
    final
        True for the end-of-night report written by ``finalize``; False for the
        QUICK-LOOK page refreshed during the night

    Returns
    -------
    Path
        the ``index.html`` written
    """
    with _WRITE_LOCK:
        return _write_report(Path(out), store, night, settings, final=final)


def _write_report(out: Path, store, night: str, settings, *, final: bool) -> Path:
    folder = out / "report" / night
    facts = collect_facts(out, store, night, settings, final=final)
    images = make_images(facts, folder.resolve())  # thumbnails found from any cwd
    page = render_html(facts, images, folder, settings)
    write_bytes(folder / "night.json",
                json.dumps(facts, indent=1, default=str, allow_nan=False).encode(), fsync=False)
    return write_bytes(folder / "index.html", page.encode(), fsync=False)


__all__ = ["write_report", "collect_facts", "render_html", "fits_previews", "png_thumbnail",
           "filter_colours", "settings_toml", "software_versions", "_arrived_as_a_batch"]
