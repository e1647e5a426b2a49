"""The night report: facts (night.json), plots and the HTML page (see :mod:`.html`)."""

from photowatch.report.html import (
                                    collect_facts,
                                    filter_colours,
                                    fits_previews,
                                    png_thumbnail,
                                    render_html,
                                    settings_toml,
                                    software_versions,
                                    write_report,
)

__all__ = ["write_report", "collect_facts", "render_html", "fits_previews", "png_thumbnail",
           "filter_colours", "settings_toml", "software_versions"]
