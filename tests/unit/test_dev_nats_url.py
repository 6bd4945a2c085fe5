"""Which NATS `ridethrough dev` uses: a table of --nats-url, NATS_URL, --port, --data-dir."""

from __future__ import annotations

import pytest

from services.config import Settings
from services.errors import ConfigError
from services.tools.stack import dev_nats_url, local_stack

FLAG, ENV = "nats://flag:4222", "nats://env:4222"


@pytest.mark.parametrize(
    ("flag", "env", "port", "data_dir", "expected"),
    [
        (None, None, False, False, None),  # nothing said: the embedded server
        (None, ENV, False, False, ENV),  # NATS_URL alone: that server
        (FLAG, None, False, False, FLAG),  # --nats-url: that server
        (None, ENV, True, False, None),  # --port beats NATS_URL: embedded
        (None, ENV, False, True, None),  # --data-dir beats NATS_URL: embedded
        (None, None, True, True, None),
    ],
)
def test_dev_nats_url(
    flag: str | None, env: str | None, port: bool, data_dir: bool, expected: str | None
) -> None:
    """An explicit --port or --data-dir means the embedded server; else --nats-url, NATS_URL."""
    assert dev_nats_url(flag, env, port_given=port, data_dir_given=data_dir) == expected


@pytest.mark.parametrize(
    ("port", "data_dir", "named"), [(True, False, "--port"), (False, True, "--data-dir")]
)
def test_nats_url_with_an_embedded_option_is_refused(
    port: bool, data_dir: bool, named: str
) -> None:
    """--nats-url with --port or --data-dir is a ConfigError naming both options."""
    with pytest.raises(ConfigError, match=f"--nats-url and {named}"):
        dev_nats_url(FLAG, None, port_given=port, data_dir_given=data_dir)


def test_local_stack_refuses_a_url_and_a_port() -> None:
    """local_stack never silently picks between a NATS URL and an embedded server's port."""
    with pytest.raises(ConfigError), local_stack(Settings(), nats_url=FLAG, port=4222):
        pass
