"""prefixserve server: the engine (server.engine) and the HTTP API (server.api)."""
