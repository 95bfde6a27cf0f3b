"""`nagaya site up|down|status`: a complete single-machine site (registry + server) on loopback."""

from __future__ import annotations

from pathlib import Path

import typer

from nagaya import config
from nagaya.cli.common import console, print_json

app = typer.Typer(help="Run the site registry and server on this machine.", no_args_is_help=True)

STATE_DIR = typer.Option(None, "--state-dir", help="site data (default: /var/lib/nagaya/site as root, "
                         "else ~/.local/share/nagaya/site)", file_okay=False)
JSON = typer.Option(False, "--json", help="machine-readable output")


@app.command()
def up(state_dir: Path | None = STATE_DIR, json_out: bool = JSON) -> None:
    """Start the registry and the server (as the service account when run by root); print their URLs."""
    from nagaya.server import site

    st = site.up(config.load(), state_dir)
    if json_out:
        print_json({"registry": st.registry, "server": st.server, "state_dir": st.state_dir, "run_as": st.run_as,
                    "pids": st.pids, "running": st.running})
        return
    console.print(f"registry  {st.registry}\nserver    {st.server}\nstate     {st.state_dir} (running as "
                  f"{st.run_as})\nnext      nagaya login {st.server}", highlight=False)


@app.command()
def down(state_dir: Path | None = STATE_DIR, json_out: bool = JSON) -> None:
    """Stop the registry and the server, leaving nothing running (data stay in the state dir)."""
    from nagaya.server import site

    st, stopped = site.down(config.load(), state_dir)
    if json_out:
        print_json({"stopped": stopped, "state_dir": st.state_dir})
    else:
        console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}", highlight=False)


@app.command()
def status(state_dir: Path | None = STATE_DIR, json_out: bool = JSON) -> None:
    """Show the site's URLs and whether it runs (exit code 1 when it does not)."""
    from nagaya.server import site

    st = site.status(config.load(), state_dir)
    if json_out:
        print_json({"registry": st.registry, "server": st.server, "running": st.running, "state_dir": st.state_dir,
                    "run_as": st.run_as, "pids": st.pids, "started_at": st.started_at})
    else:
        console.print(f"registry  {st.registry}\nserver    {st.server}\nstate     {st.state_dir}\nstatus    "
                      f"{'running' if st.running else 'stopped'}", highlight=False)
    if not st.running:
        raise typer.Exit(1)
