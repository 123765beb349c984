"""The Flask receiver for WaveSpeed's signed completion webhooks."""

from webhook_receiver.app import create_app

__all__ = ["create_app"]
