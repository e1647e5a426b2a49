#!/usr/bin/env python3
"""Render a photowatch night report with headless Chromium into a PNG (a browser check).

    python tools/render_report.py OUT/report/<night>/index.html page.png [--width 1400]

The page is rendered as a browser shows it from the file system (``file://``,
no server, no network). The whole page is captured: a first pass measures its
height (``--dump-dom`` of a copy with a two-line measuring script and a
``<base href>`` to the report folder, written to a temporary folder, so nothing
is added next to the report), a second pass takes the screenshot with a window
that tall. ``--height`` skips the measurement.

Exit status: 0 when the PNG was written, 1 when Chromium failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
MAX_HEIGHT = 16000  #: px; Chromium cannot capture taller pages in one screenshot
MEASURE_JS = ("<script>window.addEventListener('load', function () {"
              "document.body.setAttribute('data-render-height',"
              " String(document.documentElement.scrollHeight)); });</script>")


def chromium_args(user_data_dir: str) -> list[str]:
    """Flags of a headless, offline, throw-away Chromium."""
    return [CHROMIUM if Path(CHROMIUM).exists() else (shutil.which("chromium") or CHROMIUM),
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", "--force-device-scale-factor=1",
            f"--user-data-dir={user_data_dir}"]


def measure_height(html: Path, width: int, workdir: Path, timeout_s: float = 60.0) -> int | None:
    """The page's full height in pixels at ``width``, or None when it cannot be measured."""
    text = html.read_text(encoding="utf-8", errors="replace")
    base = f"<base href='{html.parent.resolve().as_uri()}/'>"
    text = re.sub(r"<head>", "<head>" + base, text, count=1, flags=re.I)
    text = re.sub(r"<meta http-equiv=['\"]refresh['\"][^>]*>", "", text, flags=re.I)
    text = re.sub(r"</body>", MEASURE_JS + "</body>", text, count=1, flags=re.I)
    copy = workdir / "measure.html"
    copy.write_text(text, encoding="utf-8")
    cmd = chromium_args(str(workdir / "profile-measure")) + [
        f"--window-size={width},1000", "--virtual-time-budget=5000", "--dump-dom",
        copy.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    m = re.search(r'data-render-height="(\d+)"', done.stdout)
    return int(m.group(1)) if m else None


def render(html: Path, png: Path, *, width: int = 1400, height: int | None = None,
           timeout_s: float = 90.0) -> Path:
    """Screenshot ``html`` (a local file) into ``png``; returns ``png``.

    Raises
    ------
    FileNotFoundError
        the page or Chromium is missing
    RuntimeError
        Chromium failed or wrote no image (its stderr is in the message)
    """
    html = Path(html).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html}: no such report page")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="render-report-") as tmp:
        work = Path(tmp)
        if height is None:
            height = measure_height(html, width, work) or 3000
        height = max(600, min(int(height), MAX_HEIGHT))
        png.unlink(missing_ok=True)
        cmd = chromium_args(str(work / "profile")) + [
            f"--window-size={width},{height}", "--virtual-time-budget=5000",
            f"--screenshot={png}", html.as_uri()]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except FileNotFoundError:
            raise FileNotFoundError(f"{cmd[0]}: Chromium not found (apt-get install chromium)"
                                    ) from None
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"Chromium did not finish within {timeout_s:.0f} s") from exc
    if not png.is_file() or png.stat().st_size == 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}): {tail}")
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report_html", type=Path, help="the report page (index.html)")
    p.add_argument("out_png", type=Path, help="the PNG to write")
    p.add_argument("--width", type=int, default=1400, help="window width in px (default 1400)")
    p.add_argument("--height", type=int, default=None,
                   help="window height in px (default: the page's full height)")
    args = p.parse_args(argv)
    if args.width < 320:
        p.error("--width must be at least 320")
    try:
        out = render(args.report_html, args.out_png, width=args.width, height=args.height)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"render_report: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
