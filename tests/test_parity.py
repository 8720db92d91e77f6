"""Parity with an independent implementation: torchft 0.2.0's DiLoCo and Streaming DiLoCo.

Both run in the same two torchrun processes from the same weights, batches and optimizers
(tests/torchft_parity.py); the final parameters must agree bit for bit. torchft keeps at most one
fragment in flight, so these settings have tau < H / P. Skipped when torchft is not installed
(`pip install torchft==0.2.0`; its lighthouse server is inside the wheel).
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

torchft = pytest.importorskip("torchft", reason="torchft is not installed (pip install torchft==0.2.0)")
from torchft._torchft import LighthouseServer  # noqa: E402

from torchft_parity import fresh_model  # noqa: E402

pytestmark = pytest.mark.slow  # torchft and cocodc side by side under torchrun


@pytest.mark.parametrize(
    "sync_every, fragments, delay, alpha",
    [
        (4, 1, 0, 0.0),  # DiLoCo
        (8, 2, 1, 0.5),  # Streaming DiLoCo
        (12, 4, 2, 0.0),
        (8, 4, 1, 0.25),
    ],
)
def test_matches_torchft_exactly(tmp_path, sync_every, fragments, delay, alpha):
    steps = 2 * sync_every + sync_every // fragments  # every fragment synced at least twice
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=2)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                str(REPO / "tests" / "torchft_parity.py"),
                str(tmp_path),
                lighthouse.address(),
                *map(str, (sync_every, fragments, delay, alpha, steps)),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1", "RUST_LOG": "error"},
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        lighthouse.shutdown()
    assert result.returncode == 0, result.stderr[-4000:]
    finals = [torch.load(tmp_path / f"region{r}.pt") for r in (0, 1)]
    for region, final in enumerate(finals):
        ours, theirs = final["cocodc"], final["torchft"]
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), f"region {region}: {name} differs"
    # Training moved the weights; DiLoCo (one fragment, alpha 0) ends on a sync, so its regions
    # hold the same model, while with fragments the others have trained on since their last sync.
    initial = fresh_model().state_dict()
    assert not torch.equal(finals[0]["cocodc"]["head.weight"], initial["head.weight"])
    same = all(torch.equal(finals[0]["cocodc"][k], finals[1]["cocodc"][k]) for k in initial)
    assert same == (fragments == 1 and alpha == 0.0)
