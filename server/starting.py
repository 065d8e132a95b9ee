"""The ASGI app a router replica serves while its engine starts: 503 with Retry-After, then the real app.

Loading the model and reaching the expert plane take seconds to minutes (experts load on their own nodes),
and Serve sends requests as soon as the replica's constructor returns: clients and probes can then tell
"starting" from "hung", and none of their requests waits on a replica that is not ready.
"""

from fastapi.responses import JSONResponse

from server.openai_protocol import error_body

RETRY_AFTER_S = 1  # what a client told to come back (starting, queue full) waits first


class StartingGate:
    def __init__(self):
        self.app = None  # the router's FastAPI app, once it is ready
        self.failed: str | None = None  # why it could not start

    async def __call__(self, scope, receive, send):
        if self.app is not None and scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] == "lifespan":  # Serve runs the lifespan protocol once, before the app is ready
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return
        message = f"this router could not start: {self.failed}" if self.failed else "this router is starting"
        await JSONResponse(error_body(503, message), status_code=503,
                           headers={"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
