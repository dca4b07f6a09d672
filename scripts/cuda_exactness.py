"""Half precision on a GPU: every tiny architecture's blocks, split in 3 spans, against transformers on that GPU.

    python scripts/cuda_exactness.py [--device cuda] [--dtypes bfloat16,float16] [NAME ...]

The nodes' code (`BlockSpan`, three spans with their own caches) and the client's (`ClientHead`) run
in this process, on the device, in each dtype, greedily over a left-padded batch of 2; the tokens
are compared with `AutoModelForCausalLM.generate` in the same dtype on the same device. No swarm:
what crosses the wire is these same tensors, so this checks the CUDA kernels and dtypes of the
model code. CI has no GPU; run it where one is lent and keep the table in the issue note.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hivegen.model.chain import generate_greedy
from hivegen.model.tiny import ARCHITECTURES, IN_PROCESS, make_tiny_checkpoint

SPANS = [(0, 1), (1, 3), (3, 4)]
NEW_TOKENS = 16


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 256, (2, 12), generator=generator)
    mask = torch.ones_like(input_ids)
    input_ids[1, :4], mask[1, :4] = 0, 0
    return input_ids, mask


def distributed(path: Path, dtype: torch.dtype, device: str, attn: str | None) -> torch.Tensor:
    """Greedy generation through 3 spans and the client head, as a 3-node chain computes it."""
    input_ids, mask = prompts()
    return generate_greedy(path, SPANS, input_ids, mask, NEW_TOKENS, dtype, device, attn)


def local(path: Path, dtype: torch.dtype, device: str, attn: str | None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
    input_ids, mask = prompts()
    out = model.generate(
        input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=NEW_TOKENS, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return out.cpu()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures of hivegen.model.tiny (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--attn-implementation", help="attention kernel for both sides (default: transformers' pick)")
    args = parser.parse_args()
    chosen = [a for a in [*ARCHITECTURES, *IN_PROCESS] if not args.names or a.name in args.names]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    print(f"device {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}")
    print(f"{'architecture':<14} " + " ".join(f"{str(d).removeprefix('torch.'):<22}" for d in dtypes))
    exact = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in chosen:
            path = make_tiny_checkpoint(arch, Path(tmp) / arch.name, num_layers=4)
            cells = []
            for dtype in dtypes:
                began = time.perf_counter()
                try:
                    attn = args.attn_implementation
                    expected = local(path, dtype, args.device, attn)
                    produced = distributed(path, dtype, args.device, attn)
                    differ = (expected != produced).any(dim=0).nonzero().flatten().tolist()
                    cells.append(f"differs at token {differ[0]}" if differ else "exact")
                    exact += not differ
                except Exception as exc:  # one architecture's failure is a row of the table
                    cells.append(f"error {type(exc).__name__}")
                    print(f"  {arch.name} {dtype}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                total += 1
                cells[-1] = f"{cells[-1]} ({time.perf_counter() - began:.1f}s)"
            print(f"{arch.name:<14} " + " ".join(f"{cell:<22}" for cell in cells), flush=True)
    print(f"{exact}/{total} exact")
    return 0 if exact == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
