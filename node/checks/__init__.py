"""Health checks: what a check is and its status (definition.py), and how each kind is probed
(probes.py). The agent's LocalState (node/local.py) owns the checks and runs them."""
