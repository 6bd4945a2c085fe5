"""The replayer reads a delivery's stream sequence and the consumer's pending count
from its ack subject itself; it must agree with nats-py's own parser."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from services.jetstream.pull import ack_position

V1 = "$JS.ACK.AI_PARKED.replayer-anthropic-high.3.1042.17.1732870000000000000.4711"
V2_NO_TOKEN = "$JS.ACK._.ACCHASH.AI_PARKED.c.3.1042.17.1732870000000000000.4711"
V2 = V2_NO_TOKEN + ".Xy1z"
V2_DOMAIN = "$JS.ACK.hub.ACCHASH.AI_PARKED.c.1.7.2.1732870000000000000.0.tok"


@pytest.mark.parametrize("reply", [V1, V2_NO_TOKEN, V2, V2_DOMAIN])
def test_ack_position_matches_nats_py(reply: str) -> None:
    msg = Msg(None, subject="ai.parked.anthropic.high", reply=reply)  # type: ignore[arg-type]
    meta = msg.metadata
    assert ack_position(msg) == (meta.sequence.stream, meta.num_pending)


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.def", "$JS.ACK.too.short"])
def test_ack_position_refuses_what_is_not_a_delivery(reply: str) -> None:
    msg = Msg(None, subject="ai.parked.anthropic.high", reply=reply)  # type: ignore[arg-type]
    with pytest.raises(NotJSMessageError):
        ack_position(msg)
