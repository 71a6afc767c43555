"""Helpers that start real exo processes on this machine, shared by tests/ and bench/ (never
imported by the product)."""
