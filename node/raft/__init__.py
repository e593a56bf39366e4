"""Raft for the server catalog: a sans-I/O core, wire messages, storage and runtime."""
