"""ASGI middleware of the API server (create_app adds them): JSON body limits, per-key rate limits."""
