"""`EventStream`: a streamed `text/event-stream` response for the server's token streams (lmforge/serve/api.py).

    return EventStream(self._stream(chat), on_disconnect=self._client_gone)   # Job.respond, a FastAPI route's answer

What Starlette's StreamingResponse does for them, at less cost per response. Under uvicorn (which speaks ASGI 2.3:
a send to a client that has gone returns without an error) StreamingResponse runs the body and a listener for
the disconnect as two tasks of an anyio task group, with its cancel scopes: ~10% of the HTTP process's time at 64
streaming clients on the demo model (py-spy, BENCHMARKS.md "Serving", session 22). Here the body runs in the
request's own task and one plain asyncio task waits for `http.disconnect`, then calls `on_disconnect`: the job
cancels its engine requests, whose "cancelled" ends arrive like any other and end the body.

    python -m pytest -q tests/test_serve_api.py -k dropped
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response

DONE = "data: [DONE]\n\n"  # an OpenAI stream's last event


class EventStream(Response):
    """The body's strings, each sent as it comes; the one ending with `DONE` also ends the response, in the same write
    (the finish reason, the usage and [DONE] arrive together: one write and one wake-up of the client, not four). On
    loopback a write cost the server ~70 us, most of it waking the client (cProfile of uvicorn's send at 16 streaming
    clients on 2 cores, BENCHMARKS.md "Serving", session 23). The headers go at once: a queued request's client sees
    its stream start."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[str], on_disconnect: Callable[[], None]):
        self.body_iterator, self.on_disconnect = body, on_disconnect
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_disconnect()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            ended = False
            async for chunk in self.body_iterator:  # to its end, which runs the body's own `finally`
                ended = chunk.endswith(DONE)
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not ended})
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
