"""The night report: facts (night.json), plots and the HTML page (see :mod:`.html`).

The entry points are re-exported lazily, so ``photowatch status`` (which needs only
:mod:`.facts`) does not import Jinja2 and the plotting code.
"""

from __future__ import annotations

__all__ = ["write_report", "collect_facts", "render_html", "fits_previews", "png_thumbnail",
           "filter_colours", "settings_toml", "software_versions"]


def __getattr__(name: str):
    if name in __all__:
        from photowatch.report import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
