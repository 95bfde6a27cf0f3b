"""`python -m nagaya.server SETTINGS.json`: migrate the database, then serve the app with uvicorn.
`nagaya site up` starts it this way, as the service account."""

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

    from nagaya.server.app import create_app
    from nagaya.server.settings import ServerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings.load(Path(argv[0]))
    app = create_app(settings)
    app.state.site.db.migrate()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=True,
                proxy_headers=False, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
