"""``python -m xdask.cli_local``: the same as the ``xdask-local`` script."""

from xdask.cli import local_main

if __name__ == "__main__":
    local_main()
