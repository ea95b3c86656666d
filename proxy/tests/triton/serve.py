"""A real Triton Inference Server (PyTriton's bundled tritonserver, on CPU)
serving one decoupled model shaped like TensorRT-LLM's `ensemble`: inputs
`text_input`, `max_tokens`, and optional `temperature`, `top_p`,
`presence_penalty`, `frequency_penalty`, `random_seed`, `stop_words` and
`stream`, under the ensemble's names; output `text_output`. Its generated
text is deterministic, and its first word says which sampling inputs
reached it, so a test can see each one arrive through Tollgate's Triton
translation.

Run by proxy/tests/gateway/triton.rs from the venv scripts/test.sh makes
with Debian's python3.11:

    target/triton-venv/bin/python serve.py --model trt-model \\
        --http-port 8000 --grpc-port 8001 --metrics-port 8002
"""

import argparse

import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def first(request, name, default):
    value = request.data.get(name)
    return default if value is None else value.reshape(-1)[0]


def pieces(request):
    """The answer's pieces: `max_tokens` words, the first naming the inputs."""
    prompt = first(request, "text_input", b"").decode("utf-8", "replace")
    count = int(first(request, "max_tokens", 16))
    sampling = "/".join(
        f"{name}={float(first(request, name, -1)):g}"
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")
    )
    seed = int(first(request, "random_seed", 0))
    stop = request.data.get("stop_words")
    stops = "+".join(w.decode() for w in stop.reshape(-1)) if stop is not None else "-"
    out = [f"[{sampling}/seed={seed}/stop={stops}]"]
    start = len(prompt)
    out += [" " + WORDS[(start + i) % len(WORDS)] for i in range(1, count)]
    return out[:count]


def generate(requests):
    """One response with the whole text, or one per piece when streaming."""
    plans = [(pieces(r), bool(first(r, "stream", False))) for r in requests]
    if not any(stream for _, stream in plans):
        yield [{"text_output": np.array(["".join(p).encode()], dtype=object)} for p, _ in plans]
        return
    for step in range(max(len(p) for p, _ in plans)):
        yield [
            {"text_output": np.array([(p[step] if step < len(p) else "").encode()], dtype=object)}
            for p, _ in plans
        ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="trt-model")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=generate,
            inputs=[
                Tensor(name="text_input", dtype=bytes, shape=(1,)),
                Tensor(name="max_tokens", dtype=np.int32, shape=(1,)),
                *(
                    Tensor(name=name, dtype=np.float32, shape=(1,), optional=True)
                    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")
                ),
                Tensor(name="random_seed", dtype=np.uint64, shape=(1,), optional=True),
                Tensor(name="stop_words", dtype=bytes, shape=(-1,), optional=True),
                Tensor(name="stream", dtype=np.bool_, shape=(1,), optional=True),
            ],
            outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,))],
            config=ModelConfig(batching=False, decoupled=True),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
