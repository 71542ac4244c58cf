"""tunnelwatch's probe engine: everything that touches the network or the disk while monitoring."""
