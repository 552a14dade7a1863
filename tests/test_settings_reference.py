"""Every setting is declared once (agentworker.settings): the README's table and deploy/.env.example are
checked against the declarations, and the declared bounds are what start-up enforces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agentworker.settings import Settings, SettingsError, markdown_table, reference

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_table_is_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings:start -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert table == markdown_table(), "regenerate it: python -m agentworker.settings"


def test_env_example_lists_every_setting_with_its_default() -> None:
    env = (ROOT / "deploy" / ".env.example").read_text()
    for doc in reference():
        found = re.search(rf"^# {doc.variable}=(\S*)", env, re.MULTILINE)
        assert found is not None, f"{doc.variable} is missing from deploy/.env.example"
        if doc.value:
            assert found.group(1) == doc.value, f"{doc.variable}: .env.example says {found.group(1)!r}"
    listed = set(re.findall(r"^# (AGENTWORKER_[A-Z_]+)=", env, re.MULTILINE))
    assert listed == {doc.variable for doc in reference()}, "a variable .env.example names is not declared"


def test_every_setting_has_a_meaning() -> None:
    assert all(doc.meaning for doc in reference())


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("AGENTWORKER_PORT", "99999", "AGENTWORKER_PORT=99999: must be an integer >= 0 and <= 65535"),
    ("AGENTWORKER_JOB_LEASE_TTL", "0.5", "AGENTWORKER_JOB_LEASE_TTL=0.5: must be >= 1 and <= 3600"),
    ("AGENTWORKER_POLL_INTERVAL", "0", "AGENTWORKER_POLL_INTERVAL=0: must be > 0"),
    ("AGENTWORKER_ZYGOTE", "maybe", "AGENTWORKER_ZYGOTE='maybe': use on or off"),
    ("AGENTWORKER_LOG_FORMAT", "xml", "AGENTWORKER_LOG_FORMAT='xml': use json or console"),
])
def test_the_declared_bounds_are_enforced(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: value})
    assert str(refused.value) == message
