"""Operator actions: status, pause, resume, drain, replay, dead, jobs, outages, export.

Every action that changes something is written to ``ai.events.ops`` (who, what,
filters, counts, when). Every move of a job publishes its new copy and waits for
the PubAck before it removes the old one, under a msg id stable across reruns,
so an interrupted command loses nothing and a rerun duplicates nothing.
"""
