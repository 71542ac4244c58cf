"""The dashboard: `tunnelwatch serve` shows a store (a vantage point's SQLite file or the
fleet's PostgreSQL) as web pages, read-only, through the analysis code the commands use.

pages.py makes each page's facts (plain data, also served as JSON), figures.py turns the
weekly chart code's Figures into inline SVG, app.py is the Starlette application and its
templates, serve_cli.py the command. No page loads anything from outside the server.
"""
