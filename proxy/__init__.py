"""Sidecar proxy (arrives in a later issue)."""
