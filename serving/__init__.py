"""Serving: HTTP inference API, serving model store, sync receiver."""
