"""The HTTP API for producers that are not written in Python (`kq api`)."""

from producer_api.app import create_app

__all__ = ["create_app"]
