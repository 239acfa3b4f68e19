"""ASGI middleware of the API server (create_app adds them): JSON body limits, per-key rate limits."""


def replaying(body: bytes, receive):
    """An ASGI `receive` that gives the app the request body a middleware has already read, in
    one message, then hands over to the real `receive` (a disconnect, for a streamed answer)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
