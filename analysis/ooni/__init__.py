"""OONI interoperability: the store's measurements written as OONI measurements (and as CSV or
Parquet rows), and OONI's public measurements read into a store as measurements of vantage
points of their own (`ooni-<cc>-<asn>`), so the analysis commands read them like ours.

export.py reads the store a window of rounds at a time and writes; importer.py maps OONI's
experiments to rows and writes them the way compaction.py writes a store; cli.py holds the
commands `tunnelwatch export` and `tunnelwatch import ooni`.
"""
