"""Network measurement: sockets, names, paths through tunnels, the TCP, TLS, HTTP and DNS
probes and a round of them. Never touches the disk (import contracts in pyproject.toml)."""
