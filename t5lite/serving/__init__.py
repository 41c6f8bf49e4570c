"""Serving a trained model: the continuous-batching decode engine (engine.py) and the HTTP API (server.py)."""
