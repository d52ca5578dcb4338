"""Webhook delivery (placeholder until implemented)."""

from __future__ import annotations

from ifw.operator.controller import Controller


class WebhookController(Controller):
    pass
