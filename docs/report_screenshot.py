"""Screenshot of eval's Markdown report as a page, to check how it reads.

The Kubeflow UI renders the eval step's `report` artifact (`dsl.Markdown`) with
markdown-to-jsx, raw HTML off; this renders the same file with markdown-it-py (CommonMark
plus tables, raw HTML off) into a page styled like the UI's Markdown viewer, and has
headless Chromium take a screenshot.

    # a fresh tiny run (about a minute), then its report
    python docs/report_screenshot.py --out /work/report.png
    # a refused run: the gate's reasons at the top
    python docs/report_screenshot.py --set gate.min_decisive_win_rate=0.5 --out /tmp/refused.png
    # an existing report: a run folder (<run>/eval/report.md) or the file itself
    python docs/report_screenshot.py /path/to/run --out /tmp/report.png

Needs `chromium` on PATH (Debian: `apt-get install -y chromium`) and markdown-it-py
(installed with the test extras' dependencies: mlflow/rich bring it).
"""

from __future__ import annotations

import argparse
import html
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STYLE = """
body { font-family: Roboto, "Helvetica Neue", Arial, sans-serif; font-size: 14px; color: #202124;
       max-width: 1150px; margin: 16px auto; padding: 0 16px; line-height: 1.45; }
h1, h2 { padding-bottom: .3em; border-bottom: 1px solid #eee; font-weight: 700; margin-top: 1em; }
h1 { font-size: 20px; } h2 { font-size: 16px; }
code { background: #f8f8f8; border-radius: 5px; padding: 1px 4px; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #dfe2e5; padding: 4px 8px; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfbfb; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def to_html(markdown_text: str, title: str) -> str:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = md.render(markdown_text)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body class='markdown-viewer'>{body}</body></html>")


def tiny_run(workdir: Path, sets: list[str]) -> Path:
    """`rlhf run --preset tiny` in `workdir`; returns the run folder."""
    rlhf = Path(sys.executable).with_name("rlhf")
    cmd = [str(rlhf), "run", "--preset", "tiny", "--set", "num_threads=1", "--set", "gate.min_decisive_win_rate=0.0",
           *[a for s in sets for a in ("--set", s)], "--output", str(workdir / "run")]
    env = {**os.environ, "RLHF_HOME": str(workdir / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(cmd, cwd=workdir, env=env, check=True)
    return workdir / "run"


def screenshot(page: Path, out: Path, size: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", f"--window-size={size}", page.as_uri()], check=True,
                   capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="?", help="a run folder or a report.md; none: run the tiny pipeline first")
    ap.add_argument("--set", action="append", default=[], help="config override for the tiny run (repeatable)")
    ap.add_argument("--out", default="report.png", help="the PNG to write")
    ap.add_argument("--size", default="1200,2400", help="window size WIDTH,HEIGHT")
    ap.add_argument("--html", help="also keep the HTML page here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rlhf-report-") as tmp:
        src = Path(args.report) if args.report else tiny_run(Path(tmp), args.set)
        report = src / "eval" / "report.md" if src.is_dir() else src
        page = Path(args.html) if args.html else Path(tmp) / "report.html"
        page.write_text(to_html(report.read_text(), f"RLHF report: {report}"))
        screenshot(page.resolve(), Path(args.out).resolve(), args.size)
    print(f"{report} -> {args.out}")


if __name__ == "__main__":
    main()
