"""Wire contracts of ridethrough: what travels on NATS, as msgspec Structs.

Producers in other languages use the JSON Schema files in ``schemas/json/``,
generated from these Structs by ``python -m schemas.generate``.
"""

from schemas.jobs import Job, OnOutage, Priority, Target, decode_job, new_job_id
from schemas.parking import DeadLetter
from schemas.results import ErrorInfo, JobResult, Timings, Usage

__all__ = [
    "DeadLetter",
    "ErrorInfo",
    "Job",
    "JobResult",
    "OnOutage",
    "Priority",
    "Target",
    "Timings",
    "Usage",
    "decode_job",
    "new_job_id",
]
