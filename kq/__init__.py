"""The `kq` command and the local stack: the one place that wires every part together.

Nothing imports this package; it may import everything (worker, the apps, the simulator).
"""
