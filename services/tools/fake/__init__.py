"""A fake LLM provider: a real HTTP server speaking the Anthropic and OpenAI wire protocols.

Operators run it (``ridethrough fake-provider``) to rehearse outages; the test suite uses
it as the far end of every provider adapter. The official SDKs (``anthropic`` and
``openai``) work against it unchanged through ``base_url``.

Endpoints
---------
``POST /v1/messages``
    Anthropic Messages API, JSON or SSE (``"stream": true``).
``POST /model/{modelId}/invoke`` and ``/model/{modelId}/invoke-with-response-stream``
    The Messages API as Amazon Bedrock serves it (the stream: AWS event-stream frames);
    see ``cloud_wire``.
``POST /v1/projects/{p}/locations/{r}/publishers/anthropic/models/{m}:rawPredict``
    and ``:streamRawPredict``: the Messages API as Google Vertex AI serves it (SSE).
``POST /v1/chat/completions``
    OpenAI Chat Completions, JSON or SSE (``chat.completion.chunk`` ... ``data: [DONE]``;
    a final usage chunk when ``stream_options.include_usage`` is true).
``GET /v1/models`` and ``GET /v1/models/{id}``
    The configured model list, in Anthropic shape when the request carries an
    ``anthropic-version`` header and in OpenAI shape otherwise.
``GET /healthz``
    ``{"ok": true}``.
``GET /api/v2/summary.json``
    An Atlassian Statuspage summary: one component per model plus ``API``, and the
    incident scripted through ``/admin/statuspage`` or ``FaultConfig.status_incidents``.
``/admin/...``
    Runtime outages, counters and the fault configuration (see ``server``).
Any other path
    404 in the wire format of the caller.

Modules
-------
``echo``            the reply text (an echo of the last user message) and token counts
``anthropic_wire``  the Messages API: request shape, reply, stream events, errors, models
``openai_wire``     the Chat Completions API: the same for OpenAI
``cloud_wire``      the Bedrock and Vertex doors: their envelopes, event stream and errors
``faults``          ``FaultConfig``, the ``fault:...`` triggers, and which fault a request gets
``statuspage``      the status page (``summary.json``) and its scripted incidents
``server``          ``FakeProvider``: the aiohttp server, counters, admin API, ``serve()``
``harness``         ``run_in_thread()``: a server on its own loop, for synchronous tests
``calls``           the call log: arrival times of requests per model, probes apart
``received``        digests of large request bodies (a large job arrived whole)

Run it with ``ridethrough fake-provider --port 8787 [--latency-ms X] ...``, with
``serve()``, with ``FakeProvider`` inside an event loop, or with ``run_in_thread()`` from
synchronous code such as tests.
"""

from services.tools.fake.faults import (
    DEFAULT_MODELS,
    FaultConfig,
    Outage,
    OutageStatus,
    WindowStatus,
    config_from_options,
    parse_error_mix,
    parse_outage,
)
from services.tools.fake.harness import FakeProviderThread, run_in_thread
from services.tools.fake.server import PROVIDER_KEY, FakeProvider, build_app, serve

__all__ = [
    "DEFAULT_MODELS",
    "PROVIDER_KEY",
    "FakeProvider",
    "FakeProviderThread",
    "FaultConfig",
    "Outage",
    "OutageStatus",
    "WindowStatus",
    "build_app",
    "config_from_options",
    "parse_error_mix",
    "parse_outage",
    "run_in_thread",
    "serve",
]
