"""tunnelwatch's analysis: from the stored measurements to outages, event checks, charts and
reports.

The store is read by frames.py alone (read-only) and written by compaction.py alone (hourly
summaries, the deletion of summarised raw rows); `store retire` (cli.py) drops the central
store's old monthly partitions through probe/store/central.py. Between them the work is pure, over
DataFrames: summary.py (verdict runs, hourly counts and latency, coverage), verdicts.py,
outages.py, fleet.py, events.py, eventstats.py with eventcheck.py, detect.py; pipeline.py
joins the reading to the answers. Files are read by events.py (calendars) and series.py
(CSV exports), written by report.py; charts.py draws Figures; cli.py, outages_cli.py,
check_cli.py and detect_cli.py parse arguments and print, with options.py's shared options.
"""
