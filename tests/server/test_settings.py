"""Settings (``XDASK_*`` variables and ``xdask.*`` keys), ``--log-level`` and rotating log files.

Light: no server or cluster. Log rotation runs in a child process, since a
process installs its log handler once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from xdask import cli, config
from xdask.cli_cluster import pop_log_level

#: The seed's variables and the dask.config key each one sets.
SEED_VARIABLES = {
    "XDASK_HOME": ("xdask.home", "/data/xd", "/data/xd"),
    "XDASK_ENDPOINT": ("xdask.endpoint", "http://10.0.0.1:9997", "http://10.0.0.1:9997"),
    "XDASK_MODEL_SRC": ("xdask.model-src", "modelscope", "modelscope"),
    "XDASK_HEALTH_CHECK_ATTEMPTS": ("xdask.health-check.attempts", "5", 5),
    "XDASK_HEALTH_CHECK_INTERVAL": ("xdask.health-check.interval", "2.5", 2.5),
    "XDASK_DISABLE_HEALTH_CHECK": ("xdask.health-check.disable", "1", 1),
    "XDASK_DISABLE_METRICS": ("xdask.metrics.disable", "1", 1),
    "XDASK_LOG_LEVEL": ("xdask.logs.level", "DEBUG", "DEBUG"),
    "XDASK_LOG_MAX_BYTES": ("xdask.logs.max-bytes", "1000", 1000),
    "XDASK_LOG_BACKUP_COUNT": ("xdask.logs.backup-count", "2", 2),
}

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.mark.parametrize("name", sorted(SEED_VARIABLES))
def test_seed_variable_sets_its_key(name: str) -> None:
    key, raw, value = SEED_VARIABLES[name]
    node = config._env_overrides({name: raw})
    for part in key.split("."):
        node = node[part]
    assert node == value


def test_seed_variables_reach_dask_config_in_a_new_process(tmp_path: Path) -> None:
    env = {**ENV, **{name: raw for name, (_, raw, _) in SEED_VARIABLES.items()}, "XDASK_HOME": str(tmp_path)}
    code = textwrap.dedent("""
        import json, dask.config, xdask.config
        keys = %r
        print(json.dumps({k: dask.config.get(k) for k in keys}))
    """ % [key for key, _, _ in SEED_VARIABLES.values()])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import json

    got = json.loads(out.stdout)
    for name, (key, _, value) in SEED_VARIABLES.items():
        assert got[key] == (str(tmp_path) if name == "XDASK_HOME" else value), name


def test_defaults_of_the_new_settings() -> None:
    assert config.get("logs.max-bytes") == 100 * 2**20
    assert config.get("logs.backup-count") == 30
    assert config.get("health-check.attempts") == 3 and config.get("health-check.interval") == 3
    assert config.get("health-check.disable") is False and config.get("metrics.disable") is False


def test_log_file_rotates_at_the_configured_size(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import logging
        from xdask.logs import setup_logging
        path = setup_logging("server", console=False)
        log = logging.getLogger("xdask.test")
        for i in range(400):
            log.info("line %04d %s", i, "x" * 60)
        print(path)
    """)
    env = {**ENV, "XDASK_HOME": str(tmp_path), "XDASK_LOG_MAX_BYTES": "2000", "XDASK_LOG_BACKUP_COUNT": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.parent.parent == tmp_path / "logs" and path.parent.name.startswith("server_")
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["xdask.log", "xdask.log.1", "xdask.log.2", "xdask.log.3"]  # 3 backups, no more
    assert all(p.stat().st_size <= 2000 for p in path.parent.iterdir())
    assert "line 0399" in path.read_text()


def test_log_level_setting_and_option(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import logging
        from xdask.logs import setup_logging
        setup_logging("worker", console=False)
        print(logging.getLogger("xdask").level)
    """)
    env = {**ENV, "XDASK_HOME": str(tmp_path), "XDASK_LOG_LEVEL": "warning"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(30)


@pytest.mark.parametrize("command", [cli.local_main, cli.server_main, cli.main])
def test_every_command_has_log_level(command) -> None:
    out = CliRunner().invoke(command, ["--help"])
    assert out.exit_code == 0 and "--log-level" in out.output
    bad = CliRunner().invoke(command, ["--log-level", "LOUD", "--help"])
    assert bad.exit_code == 2 and "unknown log level" in bad.output


def test_group_log_level_reaches_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    class NoModels:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def list_models(self):
            return {}

    monkeypatch.setattr(cli, "_client", lambda endpoint: NoModels())
    before = list(logging.getLogger("xdask").handlers), logging.getLogger("xdask").level
    try:
        out = CliRunner().invoke(cli.main, ["--log-level", "debug", "list"])
        assert out.exit_code == 0, out.output
        assert logging.getLogger("xdask").level == logging.DEBUG
    finally:
        for handler in set(logging.getLogger("xdask").handlers) - set(before[0]):
            logging.getLogger("xdask").removeHandler(handler)
        logging.getLogger("xdask").setLevel(before[1])


def test_worker_log_level_is_taken_out_of_dask_worker_args() -> None:
    assert pop_log_level(["tcp://h:1", "--log-level", "DEBUG"]) == (["tcp://h:1"], "DEBUG")
    assert pop_log_level(["--log-level=info", "--", "--log-level", "x"]) == (["--", "--log-level", "x"], "info")
    out = subprocess.run([sys.executable, "-c", "from xdask.cli_cluster import worker_main; worker_main()",
                          "--log-level", "LOUD", "tcp://127.0.0.1:1"], env=ENV, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 2 and "unknown log level" in out.stderr


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and not path.endswith("dask-config"):
            keys += _leaf_keys(value, path)
        else:
            keys.append(path)
    return keys


def test_readme_lists_every_setting_and_variable() -> None:
    import yaml

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("### Settings"):readme.index("### Logs")]
    defaults = yaml.safe_load((Path(config.__file__).with_name("xdask.yaml")).read_text())["xdask"]
    missing = [key for key in _leaf_keys(defaults) if f"| `{key}` |" not in table]
    assert not missing, f"settings missing from the README table: {missing}"
    aliases = [name for name in config._FLAT_ALIASES if f"`{name}`" not in table]
    assert not aliases, f"variables missing from the README table: {aliases}"
