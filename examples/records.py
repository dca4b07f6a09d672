"""Generations as records: replay, prefix reuse, resampling and traces on a local cluster.

    python examples/records.py [MODEL] [--store DIR]

MODEL is a checkpoint directory or a prepared demo model (default: smollm2). Without --store the
records go to a fresh temporary directory, removed at the end, so every run starts from an empty store.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from hivegen.client.client import Client
from hivegen.cluster import LocalCluster
from hivegen.model.demo import resolve_model_path


def show(label: str, g, seconds: float) -> None:  # type: ignore[no-untyped-def]
    source = "replayed from the store" if g.replayed else f"{len(g.step_seconds)} network steps"
    print(f"{label:<24} {seconds * 1000:8.1f} ms  {source:<24} {g.finish_reason:<6} {g.ref[:12]}  {g.text[:40]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--store", default=None, help="store directory (default: a fresh temporary one)")
    args = parser.parse_args()
    path = resolve_model_path(args.model)
    temporary = tempfile.TemporaryDirectory(prefix="hivegen-store-") if args.store is None else None
    store = args.store or temporary.name  # type: ignore[union-attr]
    with LocalCluster(path, nodes=2) as cluster, Client(path, cluster.initial_peers, store=store) as client:
        prompt = "The three most useful kitchen tools are" if client.tokenizer else [5, 17, 99, 42, 7]

        def timed(label: str, call):  # type: ignore[no-untyped-def]
            began = time.perf_counter()
            g = call()
            show(label, g, time.perf_counter() - began)
            return g

        sample = {"temperature": 0.8, "top_p": 0.95, "seed": 7}
        first = timed("generate 16 tokens", lambda: client.generate(prompt, max_new_tokens=16, **sample))
        timed("same request again", lambda: client.generate(prompt, max_new_tokens=16, **sample))
        timed("first 8 of it", lambda: client.generate(prompt, max_new_tokens=8, **sample))
        timed("continue to 32 tokens", lambda: client.generate(prompt, max_new_tokens=32, **sample))
        timed("resample after token 4", lambda: client.resample(first.ref, from_token=4, seed=8))

        def flow() -> None:
            answer = client.generate(prompt, max_new_tokens=8, temperature=0.8)
            client.generate(list(answer.request.prompt_ids) + list(answer.tokens), max_new_tokens=8, temperature=0.8)

        with client.trace("example") as recording:
            flow()
        with client.trace("example", replay=recording.ref) as replay:
            flow()
        print(f"trace replay: {[g.replayed for g in replay.calls]} (True = no network)")
        rewound = recording.rewind(1)
        with client.trace("example", replay=rewound) as resampled:
            flow()
        print(f"after rewind(1): {[g.replayed for g in resampled.calls]} (the last call is sampled anew)")
        if temporary is None:
            print(f"records are in {store}; list them with: hivegen store ls --store {store}")
        else:
            print("records were in a temporary store, removed at exit; pass --store DIR to keep them")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
