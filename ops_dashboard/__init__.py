"""The ops dashboard: a token-protected Flask app, separate from the public webhook receiver."""
