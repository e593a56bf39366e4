"""Built-in certificate authority (arrives in a later issue)."""
