"""The daemon, one part a job: its lifecycle (daemon.py), the schedule and its child jobs,
the rounds, reloads, the store writer, the upload to the fleet, the loop watch, metrics and
systemd notifications."""
