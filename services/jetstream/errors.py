"""nats-py's errors, read once: which mean "NATS is away for a moment", which mean "not
there", which mean "the condition of a conditional write failed". Matched by class and
by JetStream error code, never by message text. Code outside ``services.jetstream``
catches these tuples (or the ``services.errors`` classes the boundary raises), never a
nats-py class by name.
"""

from __future__ import annotations

from typing import Final

import nats.errors
import nats.js.errors

from services.errors import NatsUnavailable

#: What nats-py raises while NATS is away for a moment (a restart, a lost node, a
#: JetStream leader election): expected, worth a warning and a retry, never a bug report.
#: ``asyncio.TimeoutError`` is the builtin ``TimeoutError`` here (Python 3.11+).
NATS_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    TimeoutError,
    NatsUnavailable,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)

#: A message, stream, consumer, key or object that is not there (KeyNotFoundError,
#: ObjectNotFoundError and the rest are NotFoundError's subclasses).
NOT_FOUND: Final[tuple[type[BaseException], ...]] = (
    nats.js.errors.NotFoundError,
    nats.js.errors.NoKeysError,
)

#: JetStream's "no responders": no stream listens on the subject, or the stream that does
#: has no leader for a moment (an election in a cluster).
NO_RESPONDERS: Final[tuple[type[BaseException], ...]] = (
    nats.js.errors.NoStreamResponseError,
    nats.errors.NoRespondersError,
)

#: A message larger than the server's max_payload, refused before it was sent.
TOO_LARGE: Final[tuple[type[BaseException], ...]] = (nats.errors.MaxPayloadError,)

#: No answer in time: nats-py's TimeoutError, or the builtin one it also raises.
TIMEOUT: Final[tuple[type[BaseException], ...]] = (nats.errors.TimeoutError, TimeoutError)

#: JetStream's error codes for a failed ``Nats-Expected-Last-Subject-Sequence`` (and
#: ``-Sequence``) condition: "wrong last sequence: N", and its constant form.
WRONG_LAST_SEQUENCE_CODES: Final = frozenset({10071, 10164})

#: The base class of JetStream API errors (for an ``except`` that re-raises others).
APIError: Final = nats.js.errors.APIError


def wrong_last_sequence(exc: BaseException) -> bool:
    """Whether ``exc`` is the server refusing a conditional write: the subject (or key)
    is not at the expected sequence."""
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in WRONG_LAST_SEQUENCE_CODES
