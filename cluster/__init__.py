"""The multi-host proof (issue 14): the whole system on seven hosts built from Linux
network namespaces on this machine, through a Redis failover, a worker host cut off, a
receiver host killed and a worker host drained. `python -m cluster` (`make chaos-cluster`)
runs the full version; `tests/test_cluster.py` a small one. See `cluster.scenario`."""
