"""`python -m judge_server [OPTIONS]`: the judge service on its own, with the options of `cai judge serve`.

Both are made from `judge_server.settings.ServerSettings`; this entry point imports only the service
and cai's base modules, not the `cai` command line.
"""

import typer

from cai.cli_options import settings_command
from judge_server.settings import ServerSettings


def _serve(settings: ServerSettings) -> None:
    from judge_server.server import serve

    serve(settings)


def main() -> None:
    typer.run(settings_command(ServerSettings, _serve, doc="Serve critique, revision, comparison and scoring over HTTP."))


if __name__ == "__main__":
    main()
