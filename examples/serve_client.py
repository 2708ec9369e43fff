"""A client of `lddm-export serve` (and of a `triton-repo` repository) with tritonclient.

    lddm-export serve --bundle bundles/text-fuji --port 8000 &
    python examples/serve_client.py --url localhost:8000 --steps 16 --num 2 --prompt "ROMEO:"
    python examples/serve_client.py --url localhost:8001 --grpc --steps 8 --requests 16

Each request is one row of scalar inputs (runtimes/serving.py): seed, num, steps, and optionally
latent_steps, prompt or template. Concurrent requests with the same steps are batched by the
server into one sampler call. The response holds tokens [num, L], their decoded text, and an
error sentence: "" when the request was served, else what to fix (and no tokens or text).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def request_inputs(module, seed: int, num: int, steps: int, latent_steps: int = 0, prompt: str = "",
                   template: str = "") -> list:
    """One request's tritonclient inputs (module: tritonclient.http or tritonclient.grpc)."""
    inputs = []
    for name, value in (("seed", seed), ("num", num), ("steps", steps), ("latent_steps", latent_steps)):
        tensor = module.InferInput(name, [1, 1], "INT64")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.int64))
        inputs.append(tensor)
    for name, text in (("prompt", prompt), ("template", template)):
        if text:
            tensor = module.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
            inputs.append(tensor)
    return inputs


def response_fields(result) -> dict:
    """{"tokens": int64 [num, L], "text": [str], "error": str} of one response; a refused
    request has only its error (tokens None, text [])."""
    error = result.as_numpy("error")[0, 0].decode("utf-8")
    if error:
        return {"tokens": None, "text": [], "error": error}
    return {"tokens": result.as_numpy("tokens")[0], "text": [t.decode("utf-8") for t in result.as_numpy("text")[0]],
            "error": error}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="localhost:8000", help="HOST:PORT (HTTP, or gRPC with --grpc)")
    p.add_argument("--grpc", action="store_true")
    p.add_argument("--model", default="lddm")
    p.add_argument("--requests", type=int, default=1, help="concurrent requests (seeds seed, seed + 1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="samples per request")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--latent-steps", type=int, default=0)
    p.add_argument("--prompt", default="")
    p.add_argument("--template", default="")
    args = p.parse_args()
    if args.grpc:
        import tritonclient.grpc as module
        client = module.InferenceServerClient(args.url)
    else:
        import tritonclient.http as module
        client = module.InferenceServerClient(args.url, concurrency=args.requests)
    start = time.perf_counter()
    pending = [client.async_infer(args.model, request_inputs(module, args.seed + i, args.num, args.steps,
                                                             args.latent_steps, args.prompt, args.template))
               for i in range(args.requests)] if not args.grpc else None
    if args.grpc:   # the gRPC client's async_infer takes a callback; call it from threads instead
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(args.requests) as pool:
            results = list(pool.map(lambda i: client.infer(args.model, request_inputs(
                module, args.seed + i, args.num, args.steps, args.latent_steps, args.prompt, args.template)),
                range(args.requests)))
    else:
        results = [r.get_result() for r in pending]
    elapsed = time.perf_counter() - start
    for i, result in enumerate(results):
        fields = response_fields(result)
        ids = None if fields["tokens"] is None else fields["tokens"].tolist()
        print(json.dumps({"seed": args.seed + i, "error": fields["error"], "text": fields["text"], "ids": ids}))
    print(f"{args.requests} requests x {args.num} samples in {elapsed:.2f} s", flush=True)


if __name__ == "__main__":
    main()
