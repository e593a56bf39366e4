"""Consul-compatible DNS: answers from the local replica (resolver.py), UDP+TCP (server.py)."""
