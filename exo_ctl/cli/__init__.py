"""The exoctl command line: kubectl verbs for exo clusters (apply, diff, get, describe, delete, wait)."""
