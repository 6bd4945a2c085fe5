"""``ridethrough notifier``: outage notifications (webhook, Slack, PagerDuty) from AI_EVENTS."""

from services.notifier.notifier import Notifier, serve_notifier

__all__ = ["Notifier", "serve_notifier"]
