"""Times as the store writes them (ISO 8601 text) read back for the report."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(text: str | None) -> datetime | None:
    """An ISO time from the store as an aware datetime (UTC when it has no zone), or None."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
