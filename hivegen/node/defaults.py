"""A node's defaults for memory and batching, light to import (the CLI states them in its help)."""

DEFAULT_CACHE_TOKENS = 65536  # the KV-cache pool on CPU when no budget is given
CUDA_CACHE_SHARE = 0.8  # of the GPU memory free once the blocks are loaded, when no budget is given
DEFAULT_MAX_ROWS = 64  # the most sequences one forward runs
DEFAULT_PREFILL_CHUNK = 512  # prompt positions per forward
DEFAULT_BATCH_WAIT = 0.0  # seconds a decode step may wait for other sessions' due steps (0: never)
MAX_BATCH_WAIT = 0.05  # seconds: the most `--batch-wait auto` waits
MAX_BATCH_WAIT_SET = 1.0  # seconds: the most `--batch-wait SECONDS` may be
