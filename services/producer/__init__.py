"""The client library backend services use to submit AI jobs and read their results."""

from services.producer.client import (
    Producer,
    SubmitOutcome,
    job_id_for_key,
    make_job,
    prompt_request,
)

__all__ = ["Producer", "SubmitOutcome", "job_id_for_key", "make_job", "prompt_request"]
