"""Network measurement: sockets, names, paths through tunnels, the TCP, TLS, HTTP and DNS
probes and a round of them. Never touches the store (import contracts in pyproject.toml); of
the disk it reads only resolv.conf, the hosts file and CA bundles."""
