"""A drop-in HTTP gateway: the official SDKs, pointed at it by ``base_url``, ride through
provider outages (``ridethrough gateway``).

Two doors: the Anthropic Messages API (``POST /v1/messages``, on
``gateway.anthropic_provider``) and the OpenAI Chat Completions API
(``POST /v1/chat/completions``, on ``gateway.openai_provider``; null: not served). They
share this contract; each answers in its own API's shapes (``anthropic_wire``,
``openai_wire``). ``stream: true`` is answered, once the job's result is in, as the API's
server-sent events cut from the finished answer (``sse``): one delta per content block.

The contract
------------

Keys. A gateway key (``x-api-key``, or ``Authorization: Bearer``: what the SDK sends for
``api_key=`` / ``auth_token=``) names a tenant; keys are configured as SHA-256 digests
(``gateway.keys``, ``gateway.keys_file``). The request becomes a job of that tenant, read
back from that tenant's results only. A missing or unknown key is a 401
``authentication_error``. Provider keys stay in the workers.

One request, one job. The body (less ``model`` and ``stream``) becomes the job's
``request``; it is stored (JetStream PubAck) on the gateway's ``gateway.anthropic_provider``
before the gateway waits for the result, which it answers byte for byte as the provider's
JSON (the wait: ``results``, one consumer per tenant). Every answer carries
``x-ridethrough-job-id``.

Waiting. A request waits up to ``x-ridethrough-wait-s`` seconds (default
``gateway.wait_s``, at most ``gateway.max_wait_s``), and never past one second before
the SDK's own timeout (``x-stainless-read-timeout``, ``x-stainless-timeout``). When the
wait runs out (the provider is down and the job parked), the answer is a 529
``overloaded_error`` (OpenAI's door: a 503 ``server_error``, code ``overloaded``) with
``retry-after`` and ``x-ridethrough-job-id``: the job is kept and will be answered once.

Retries. What the official Python SDK (anthropic 2.14) sends on its own retries:
``x-stainless-retry-count: <n>`` and the same headers as the first attempt (anything in
``extra_headers`` / ``default_headers`` included). It makes an idempotency key per
request (``stainless-python-retry-<uuid>``) but the Anthropic client sends it under no
header (its ``_idempotency_header`` is ``None``): nothing the SDK adds by itself ties a
retry to the first attempt. So:

- Send ``Idempotency-Key: <key>`` (per call: ``extra_headers={"Idempotency-Key": key}``).
  The key fixes the job id (``job_id_for_key``; the msg id is scoped by tenant), so every
  retry with it, the SDK's own included, picks up the same job: JetStream drops the
  second publish (``Nats-Msg-Id``), a stored result is answered without publishing at
  all (beyond the dedup window too), and the provider is called once. The 529 then says
  ``x-should-retry: true``, and the SDK retries after ``retry-after``.
- Or send back ``x-ridethrough-job-id: <id>`` from a 529: the same job.
- Without either, the 529 says ``x-should-retry: false``: an SDK retry would carry
  nothing naming the job and would be a second job (a second provider call). The caller
  reads the job id from the error's response headers and retries with it, or polls
  ``GET /v1/jobs/{id}``.

A key names one request: the same key with another body answers the first body's job.

Errors are Anthropic's shape, ``{"type":"error","error":{"type":...,"message":...}}``: a
body that is not JSON or lacks ``model``/``max_tokens``/``messages`` is a 400
``invalid_request_error`` (never a 500); a body over ``gateway.max_body_bytes`` (32 MB,
the Messages API's limit) or a job over ``bodies.max_bytes`` is a 413 (a job over NATS's
max_payload goes by reference: ``services/bodies.py``); a job that ended in
a dead letter answers its reason's status (``anthropic_wire.FAILURES``: the provider's
400 is a 400 ``invalid_request_error``) with ``x-should-retry: false``; NATS unreachable
is a 503 with ``retry-after`` (nothing was stored).

``Prefer: respond-async`` answers 202 with the job id and ``Location: /v1/jobs/{id}``;
``GET /v1/jobs/{id}`` answers ``{"type": "job", "id": ..., "state": ...}`` with ``state``
``waiting`` (stored, no worker has it), ``in_flight`` (a worker has it, or it waits between
attempts), ``parked`` (with ``parked: {reason, since, outage_id}``), or ``done`` (with
``status`` and the ``result`` or the ``error``); a 404 ``not_found_error`` for a job the
caller's tenant does not have (another tenant's job is indistinguishable from none). Parked
jobs are found through the job locator (``services/lifecycle/locator.py``); waiting ones by
reading the tenant's subjects of AI_JOBS.
"""

from services.gateway.app import (
    IDEMPOTENCY_HEADER,
    JOB_ID_HEADER,
    WAIT_HEADER,
    Gateway,
    running_gateway,
    serve_gateway,
)
from services.gateway.keys import KeyRing, key_digest

__all__ = [
    "IDEMPOTENCY_HEADER",
    "JOB_ID_HEADER",
    "WAIT_HEADER",
    "Gateway",
    "KeyRing",
    "key_digest",
    "running_gateway",
    "serve_gateway",
]
