"""`python -m nagaya.server SETTINGS.json`: migrate the database, then serve the app with uvicorn in
`server.workers` processes. `nagaya site up` starts it this way, as the service account."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m nagaya.server SETTINGS.json\n")
        return 2
    if os.geteuid() == 0:
        sys.stderr.write("nagaya server: refusing to run as root (run it as the service account)\n")
        return 1
    import uvicorn

    from nagaya.server.app import SETTINGS_ENV
    from nagaya.server.settings import ServerSettings
    from nagaya.sitedb import SiteDatabase

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = Path(argv[0]).absolute()
    settings = ServerSettings.load(path)
    db = SiteDatabase(settings.database)
    db.migrate()                          # once, before any server process opens the database
    db.dispose()
    os.environ[SETTINGS_ENV] = str(path)
    # Each process builds its own app from the settings file (uvicorn spawns its workers, it does not fork).
    # httptools and uvloop are used when installed (uvicorn's "auto"). No access log: formatting and
    # flushing a line per request cost about 0.1 ms of CPU, near a tenth of a token request; the registry
    # logs every request, and the audit table every decision that matters.
    uvicorn.run("nagaya.server.app:app_from_env", factory=True, workers=settings.process_count,
                host=settings.host, port=settings.port, log_level="info", access_log=False,
                proxy_headers=False, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
