"""The disk: the tables' columns (schema), a vantage point's SQLite store and the file under
it, the spool's upload cursor, and the fleet's central PostgreSQL. Never imports measurement,
the fleet, the daemon or analysis."""
