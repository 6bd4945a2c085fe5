"""What a delivery's ack subject tells without ``msg.metadata``: its stream sequence, its
consumer's pending count and its delivery count, in both subject forms, as nats-py reads
them."""

from __future__ import annotations

import nats.errors
import pytest
from nats.aio.msg import Msg

from services.jetstream.pull import ack_position, deliveries

V1 = "$JS.ACK.AI_JOBS.workers-a-normal.3.41.17.1732940000000000000.250"
V2 = "$JS.ACK._.ACCHASH.AI_JOBS.workers-a-normal.3.41.17.1732940000000000000.250.rnd"


@pytest.mark.parametrize("reply", [V1, V2, V2.rsplit(".", 1)[0]])
def test_the_ack_subject_reads_as_nats_py_reads_it(reply: str) -> None:
    """Delivery count, stream sequence and pending agree with ``msg.metadata``."""
    msg = Msg(_client=None, subject="ai.jobs.a.normal", reply=reply)  # type: ignore[arg-type]
    meta = msg.metadata
    assert deliveries(msg) == meta.num_delivered == 3
    assert ack_position(msg) == (meta.sequence.stream, meta.num_pending) == (41, 250)


def test_a_message_that_is_not_a_jetstream_delivery_is_refused_as_nats_py_does() -> None:
    """No ack subject: nats-py's own error, not a guess."""
    msg = Msg(_client=None, subject="x", reply="_INBOX.abc")  # type: ignore[arg-type]
    with pytest.raises(nats.errors.NotJSMessageError):
        deliveries(msg)
