"""Unsafe settings are refused with a ConfigError that names what to fix, and
the CLI prints it without a traceback (issue 16, item 11); a lineage given to
``kronlink submit`` is checked like every other name (item 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kronlink.cli import main
from kronlink.errors import ConfigError
from kronlink.settings import get_settings, load_settings

TOKEN = "t" * 32
PRODUCTION = {
    "KRONLINK_ENVIRONMENT": "production",
    "KRONLINK_DATABASE_URL": "postgresql://k@db/k",
    "KRONLINK_BROKER_URL": "redis://redis:6379/0",
    "KRONLINK_ADMIN_TOKEN": TOKEN,
}

# each refusal: the environment that causes it, and words the message must say
REFUSALS = {
    "sqlite in production": (
        {**PRODUCTION, "KRONLINK_DATABASE_URL": ""},
        "production needs KRONLINK_DATABASE_URL (PostgreSQL), not SQLite",
    ),
    "sqlite broker in production": (
        {**PRODUCTION, "KRONLINK_BROKER_URL": ""},
        "production needs KRONLINK_BROKER_URL (Redis)",
    ),
    "no admin token in production": (
        {**PRODUCTION, "KRONLINK_ADMIN_TOKEN": ""},
        "production needs KRONLINK_ADMIN_TOKEN",
    ),
    "short admin token": (
        {"KRONLINK_ADMIN_TOKEN": "short"},
        "admin_token must have at least 16 characters, got 5",
    ),
    "short read token": (
        {"KRONLINK_READ_TOKEN": "x" * 15},
        "read_token must have at least 16 characters, got 15",
    ),
    "visibility timeout": (
        {"KRONLINK_VISIBILITY_TIMEOUT_S": "3600", "KRONLINK_LONGEST_JOB_S": "3600"},
        "visibility_timeout_s must be at least twice longest_job_s (7200)",
    ),
    "staging inside artifacts": (
        {"KRONLINK_ARTIFACT_ROOT": "{tmp}/art", "KRONLINK_STAGING_DIR": "{tmp}/art/staging"},
        "lies inside artifact_root",
    ),
    "malformed number": ({"KRONLINK_PORT": "eighty"}, "KRONLINK_PORT: Input should be a valid"),
}


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> None:
    monkeypatch.setenv("KRONLINK_DATA_DIR", str(tmp_path / "data"))
    for key, value in env.items():
        if value:
            monkeypatch.setenv(key, value.format(tmp=tmp_path))
        else:
            monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_unsafe_setting_is_a_config_error(case, monkeypatch, tmp_path) -> None:
    env, words = REFUSALS[case]
    _env(monkeypatch, tmp_path, env)
    with pytest.raises(ConfigError) as exc:
        get_settings()
    assert words in str(exc.value)
    get_settings.cache_clear()


def test_a_safe_production_environment_passes(monkeypatch, tmp_path) -> None:
    _env(monkeypatch, tmp_path, PRODUCTION)
    s = get_settings()
    assert s.environment == "production" and s.database.startswith("postgresql")
    get_settings.cache_clear()
    assert load_settings(port=9000).port == 9000


@pytest.mark.parametrize("case", ["sqlite in production", "malformed number"])
def test_the_cli_prints_the_refusal_without_a_traceback(case, monkeypatch, tmp_path, capsys):
    env, words = REFUSALS[case]
    _env(monkeypatch, tmp_path, env)
    assert main(["worker", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"kronlink worker: error: {words}" in err.replace("unsafe settings: ", ""), err
    assert "Traceback" not in err
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("lineage", "words"),
    [("../escape", "contains '/'"), (".hidden", "starts with '.'"), ("x" * 101, "1 to 100")],
)
def test_submit_checks_the_lineage_name(lineage, words, monkeypatch, tmp_path, capsys) -> None:
    _env(monkeypatch, tmp_path, {})
    task = tmp_path / "task"
    task.mkdir()
    code = main(["submit", str(task), "--task", "t", "--lineage", lineage])
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    staging = get_settings().staging_path
    assert not staging.exists() or list(staging.iterdir()) == []  # nothing staged
    get_settings.cache_clear()
