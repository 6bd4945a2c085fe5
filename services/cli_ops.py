"""Operator commands: status, watch, pause, resume, drain, replay, dead, jobs, outages, export."""
