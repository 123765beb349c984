"""``python -m wavespeed_sim``: run the simulator (see ``cli.py``)."""

from wavespeed_sim.cli import main

raise SystemExit(main())
