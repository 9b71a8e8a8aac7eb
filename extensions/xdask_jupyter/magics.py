"""IPython magics: ``%xdask`` runs ``xdask`` CLI commands against the notebook's server, ``%%chat`` streams an answer.

``%xdask launch``/``list``/``terminate``/``workers``/... are the ``xdask``
command line's own click commands, called with the current connection's
endpoint: same options, same output, one implementation.

Examples
--------
In a notebook::

    %load_ext xdask.jupyter
    %xdask connect local
    %xdask launch -n gemma-3-270m -en llama.cpp -u g --n_parallel 2
    %xdask list

    %%chat g --max-tokens 64
    Write a haiku about Dask.

    %xdask terminate g
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

import click
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from xdask.client import ModelHandle
from xdask.errors import XdaskError
from xdask_jupyter.connection import connect, current_client, server_status
from xdask_jupyter.widgets import chat_deltas, dashboard, error_text

#: Subcommands handled here rather than by the CLI.
_OWN = ("connect", "dashboard", "help")

#: Errors shown as one line (UsageError: no traceback) instead of a traceback.
_USER_ERRORS = (XdaskError, OSError)

HELP = """\
%xdask connect [URL|local|auto] [--api-key KEY]   make URL (or the shared embedded xdask-local) the
                                  notebook's server (KEY: for a server with auth on; default XDASK_API_KEY)
%xdask launch -n NAME [-en ENGINE] [-u UID] [--n-gpu N] [--replica R] [--ENGINE_OPTION VALUE ...]
%xdask list                       running models
%xdask terminate UID              stop a model
%xdask workers                    the cluster's workers, GPUs and models
%xdask dashboard [--height H] [--proxy]   the xdask dashboard in an IFrame
%xdask <command> --help           any other `xdask` command that talks to a server: {commands}

%%chat UID [--max-tokens N] [--system S] [--temperature T] [--continue]
<message>                         send the cell to UID and stream the answer
"""


def _server_commands() -> dict[str, click.Command]:
    """The ``xdask`` CLI's commands that take ``--endpoint`` (the ones that talk to a server)."""
    from xdask.cli import main

    return {
        name: command for name, command in main.commands.items()
        if any(param.name == "endpoint" for param in command.params)
    }


@magics_class
class XdaskMagics(Magics):
    """``%xdask`` (line) and ``%%chat`` (cell); registered by ``%load_ext xdask.jupyter``.

    Attributes
    ----------
    last_answer : str | None
        The text of the latest ``%%chat`` answer.
    """

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell, **kwargs)
        self.last_answer: str | None = None
        #: ``%%chat --continue`` conversations by model uid.
        self._conversations: dict[str, list[dict[str, str]]] = {}

    @line_magic
    def xdask(self, line: str) -> None:
        """Run an xdask command against the notebook's server; ``%xdask help`` lists them."""
        try:
            args = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%xdask: {exc}") from None
        if not args or args[0] in ("help", "-h", "--help"):
            print(HELP.format(commands=", ".join(sorted(_server_commands()))))
            return
        name, rest = args[0], args[1:]
        if name == "connect":
            self._connect(rest)
        elif name == "dashboard":
            self._dashboard(rest)
        else:
            self._run_cli(name, rest)

    def _connect(self, args: list[str]) -> None:
        parser = argparse.ArgumentParser(prog="%xdask connect", add_help=False, exit_on_error=False)
        parser.add_argument("target", nargs="?", default=None)
        parser.add_argument("--api-key", default=None)
        try:
            options = parser.parse_args(args)
        except (argparse.ArgumentError, SystemExit):
            raise UsageError("usage: %xdask connect [URL|local|auto] [--api-key KEY]") from None
        try:
            client = connect(options.target, api_key=options.api_key)
            status = server_status(client.endpoint)
        except _USER_ERRORS as exc:
            raise UsageError(f"%xdask connect: {error_text(exc)}") from None
        print(f"Connected to {client.endpoint} (status {status.get('status')}, "
              f"{status.get('workers', '?')} worker(s))")

    def _dashboard(self, args: list[str]) -> None:
        parser = argparse.ArgumentParser(prog="%xdask dashboard", add_help=False, exit_on_error=False)
        parser.add_argument("--height", type=int, default=800)
        parser.add_argument("--proxy", action="store_true")
        try:
            options = parser.parse_args(args)
        except (argparse.ArgumentError, SystemExit) as exc:
            raise UsageError(f"usage: %xdask dashboard [--height H] [--proxy] ({exc})") from None
        try:
            display(dashboard(height=options.height, proxy=options.proxy))
        except _USER_ERRORS as exc:
            raise UsageError(f"%xdask dashboard: {error_text(exc)}") from None

    def _run_cli(self, name: str, args: list[str]) -> None:
        commands = _server_commands()
        command = commands.get(name)
        if command is None:
            raise UsageError(f"%xdask: unknown command {name!r}; commands: "
                             f"{', '.join(sorted([*_OWN, *commands]))}")
        if name == "terminate" and args and not args[0].startswith("-"):
            # `%xdask terminate UID`, as the issue and Xinference's habit have it.
            args = ["--model-uid", *args]
        try:
            endpoint = current_client().endpoint
        except _USER_ERRORS as exc:
            raise UsageError(f"%xdask {name}: no server ({error_text(exc)}); try %xdask connect URL") from None
        try:
            # --endpoint first: a user's own -e later on the line wins, and launch's pass-through engine
            # options stay at the end.
            key = current_client().api_key
            command.main(args=["--endpoint", endpoint, *(["--api-key", key] if key else []), *args],
                         prog_name=f"%xdask {name}", standalone_mode=False)
        except click.exceptions.Abort:
            raise UsageError(f"%xdask {name}: aborted") from None
        except click.ClickException as exc:
            raise UsageError(f"%xdask {name}: {exc.format_message()}") from None
        except SystemExit as exc:
            # Commands such as `health` and `engine` exit 1 after printing why.
            if exc.code not in (0, None):
                raise UsageError(f"%xdask {name} exited with status {exc.code}") from None

    @magic_arguments()
    @argument("model_uid", help="Uid of a running model that can chat.")
    @argument("--max-tokens", type=int, default=None, help="Longest answer in tokens (default: the server's).")
    @argument("--system", default=None, help="A system message.")
    @argument("--temperature", type=float, default=None)
    @argument("--continue", dest="cont", action="store_true",
              help="Continue this model's previous %%%%chat conversation instead of starting a new one.")
    @cell_magic
    def chat(self, line: str, cell: str) -> None:
        """Send the cell to a model as a user message and print the answer as it streams in."""
        options = parse_argstring(self.chat, line)
        text = cell.strip()
        if not text:
            raise UsageError("%%chat: the cell is empty; write the message below the %%chat line")
        history = self._conversations.get(options.model_uid, []) if options.cont else []
        user = {"role": "user", "content": text}
        messages = ([{"role": "system", "content": options.system}] if options.system else []) + history + [user]
        params: dict[str, Any] = {}
        if options.max_tokens is not None:
            params["max_tokens"] = options.max_tokens
        if options.temperature is not None:
            params["temperature"] = options.temperature
        pieces: list[str] = []
        try:
            handle = ModelHandle(current_client(), options.model_uid, {})
            for piece in chat_deltas(handle.chat(messages, stream=True, **params)):
                pieces.append(piece)
                # Flushed per chunk: ipykernel sends it to the browser now, not at the cell's end.
                print(piece, end="", flush=True)
        except _USER_ERRORS as exc:
            if pieces:
                print(flush=True)
            raise UsageError(f"%%chat {options.model_uid}: {error_text(exc)}") from None
        print(flush=True)
        self.last_answer = "".join(pieces)
        self._conversations[options.model_uid] = history + [user, {"role": "assistant",
                                                                   "content": self.last_answer}]


__all__ = ["HELP", "XdaskMagics"]
