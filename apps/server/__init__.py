"""The websocket chat server and the HTTP bits around it (browser client page, /healthz)."""

from apps.server.app import ChatServer, ServerConfig, running

__all__ = ["ChatServer", "ServerConfig", "running"]
