"""A job's lifecycle in one place.

``decide.py``  what happens to a job next: a pure function of the job, the attempt, the
               provider's answer and the breakers (retry, park, fail over, dead, ...)
``settle.py``  the one writer of what follows: a job's one result (AI_RESULTS), its dead
               letter (AI_DEAD), its parked copy (AI_PARKED), and every republish to
               AI_JOBS (replays and fail-overs), with their msg ids
"""
