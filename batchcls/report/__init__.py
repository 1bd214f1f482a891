"""``batchcls report``: one self-contained HTML page to look at a run's results instead of reading CSV rows.

The page holds a summary (counts per label, a confidence histogram, how many rows each review
threshold would send to a person), one section per label with thumbnails sorted least-confident
first, and a section for error rows with their reasons. It needs no network, server or JavaScript:
thumbnails are small JPEGs in ``<report>_files/thumbs/`` beside the page, loaded lazily by the
browser, made in the decode stage's workers and cached under a key that covers everything that
shapes them.

    thumbs.py  the thumbnail cache: keys, making them in worker processes, pruning
    page.py    CSS, the histogram and each section's HTML; every row string escaped
    build.py   build_report (rows -> sections -> page) and the terminal's one-line result
"""
from batchcls.report.build import ReportSummary, build_report, describe, files_dir
from batchcls.report.thumbs import THUMB_SIZE

__all__ = ["THUMB_SIZE", "ReportSummary", "build_report", "describe", "files_dir"]
