"""Save a screenshot of the coordinator's status page, as a person's browser shows it.

python scripts/status_screenshot.py [--url http://HOST:PORT] [--out status.png]

With --url, of a running coordinator; without, of a tiny local cluster started for it (3 nodes of an 8-block
random Llama, one of them stopped so that the page shows a coverage gap), stopped afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.browser, when run from anywhere

from tests.browser import screenshot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="the status page of a running coordinator (default: start a tiny cluster)")
    parser.add_argument("--out", default="status.png", help="where to write the PNG (default: status.png)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.url:
        print(screenshot(args.url, out))
        return 0
    from hivegen.cluster import LocalCluster
    from hivegen.model.tiny import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="hivegen-screenshot-"))
    model = make_tiny_checkpoint("llama", work / "tiny-llama", num_layers=8)
    spans = [(0, 3), (3, 6), (6, 8), (0, 4)]
    with LocalCluster(model, spans=spans, node_threads=1, work_dir=work / "cluster", coordinator=True) as cluster:
        assert cluster.coordinator is not None
        cluster.stop_node(2)  # blocks 6:8 withdrawn: a coverage gap
        time.sleep(1.0)
        print(screenshot(cluster.coordinator.status_url + "/", out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
