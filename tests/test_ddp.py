"""DistributedDataParallel training: 2 CPU processes (gloo) under torchrun end with identical weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.engine import datasets as D

HAVE_IXI = D.ixi_paths(D.load_split()["train"][0])[0].exists()


@pytest.mark.skipif(not HAVE_IXI, reason="IXI data not available")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    worker = Path(__file__).with_name("_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)
    # the ranks saw different pairs (sharded), and the weights moved from their initial values
    assert (tmp_path / "pairs0.txt").read_text() != (tmp_path / "pairs1.txt").read_text()
    from app.engine.nn.networks import build_model
    from app.engine.checkpoints import load_checkpoint
    ck = load_checkpoint(tmp_path / "ddp.pt", "unsupervised")          # written once, by rank 0
    assert ck["training"]["world_size"] == 2
    torch.manual_seed(0)
    init = build_model(ck["network"]).state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0)
