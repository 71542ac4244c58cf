"""The disk: the embedded SQLite store, the file under it and the fleet's central PostgreSQL.
Never touches the network's measurement code."""
