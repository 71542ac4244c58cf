"""The disk: the tables' columns (schema), a vantage point's SQLite store and the file under
it, the spool's upload cursor, the newest rows status reads (latest), and the fleet's central
PostgreSQL. Never imports measurement, the fleet, the daemon or analysis."""
