"""`kq` in a process whose standard library gevent patched before anything else ran.

`kq receiver` serves under gunicorn's gevent workers, and gevent must patch `socket`,
`ssl` and `threading` before any module imports them (structlog's import of asyncio
already brings `ssl` in): `kq receiver` starts itself again through this module.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from kq.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
