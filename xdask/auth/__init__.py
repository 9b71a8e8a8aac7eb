"""Authentication and authorization: Xinference-format auth configs, API keys with scopes, JWT login.

- :mod:`xdask.auth.config_file`: read and check the ``--auth-config`` file;
- :mod:`xdask.auth.scopes`: the scopes and the names Xinference files use;
- :mod:`xdask.auth.passwords`: bcrypt and plain-text passwords;
- :mod:`xdask.auth.authenticator`: API keys, tokens, login (the server's side);
- :mod:`xdask.auth.redact`: keep credentials out of logs;
- :mod:`xdask.auth.store`: the client's side (``XDASK_API_KEY``, ``xdask login``'s tokens).

The HTTP binding (which route needs which scope) is ``xdask_server.route_scopes``.
"""

from __future__ import annotations
