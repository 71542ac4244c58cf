"""Shipped defaults (tunnelwatch.toml), installed as package data."""
