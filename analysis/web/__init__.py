"""The dashboard: `tunnelwatch serve` shows a store (a vantage point's SQLite file or the
fleet's PostgreSQL) as web pages, read-only, through the analysis code the commands use.

pages.py makes each page's facts (plain data, also served as JSON), figures.py the History
page's charts from the weekly chart code, draw.py draws them as inline SVG or PNG (two of them
in a child process), cache.py keeps pages while the store stays as it was, app.py is the
Starlette application and its templates, serve_cli.py the command. No page loads anything
from outside the server. The daemon serves the same pages on metrics.listen through a child
running this command (probe/daemon/dashboard.py).
"""
