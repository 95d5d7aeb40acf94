"""A tiny OpenAI-compatible server whose every request takes a fixed time: for client-overhead benchmarks.

    python bench/latency_server.py --port 8001 --latency-ms 100
    undo generate --backend openai --base-url http://127.0.0.1:8001/v1 --teacher latency ...

It answers /health, /v1/models and /v1/chat/completions. Each completion waits
`latency` seconds (no compute: the server is not what is being measured) and
returns a fixed text with honest token counts (one "token" per word).

It is a Starlette app under uvicorn (both come with `transformers[serving]`,
the test extra): one asyncio loop, so 256 concurrent requests are 256 sleeping
coroutines. A thread-per-connection server (http.server) was the bottleneck at
that width: 256 threads waking together queue on the GIL, which added ~0.5 s
to each 1 s request on a small machine and made the client look slow.
"""

from __future__ import annotations

import argparse
import asyncio
import json

TEXT = "Sam starts with 2 apples. He buys 1 more, so 2 + 1 = 3.\n#### 3"


def make_app(latency_s: float, model: str = "latency", text: str = TEXT):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    words = len(text.split())

    def reply(payload: dict, status: int = 200) -> Response:
        return Response(json.dumps(payload), status_code=status, media_type="application/json")

    async def health(request):
        return reply({"status": "ok"})

    async def models(request):
        return reply({"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "bench"}]})

    async def chat(request):
        body = json.loads(await request.body() or b"{}")
        await asyncio.sleep(latency_s)
        n = int(body.get("n") or 1)
        return reply({
            "id": "bench", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": i, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text}} for i in range(n)],
            "usage": {"prompt_tokens": 20, "completion_tokens": words * n, "total_tokens": 20 + words * n},
        })

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--model", default="latency")
    args = parser.parse_args()
    print(f"serving http://127.0.0.1:{args.port}/v1 (model '{args.model}', {args.latency_ms:.0f} ms per request)")
    # backlog: a burst of hundreds of concurrent connections must queue, not be reset.
    uvicorn.run(make_app(args.latency_ms / 1000, args.model), host="127.0.0.1", port=args.port, log_level="warning",
                backlog=4096, access_log=False)


if __name__ == "__main__":
    main()
