"""The daemon: its lifecycle and HTTP endpoint, schedule, rounds, store writer, child jobs,
metrics and systemd notifications."""
