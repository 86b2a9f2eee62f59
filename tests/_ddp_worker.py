"""Run by tests/test_ddp.py under torchrun: a few DDP training steps, then dump this rank's weights."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from app.engine import training  # noqa: E402


def main(out_dir: str) -> None:
    cfg = training.make_config("unsupervised", out=os.path.join(out_dir, "ddp.pt"), grid="18x24x24", spacing_mm=10.0, enc="4,8,8",
                               dec="8,8", out_level=1, max_train_subjects=4, max_val_pairs=1, val_every=0,
                               ckpt_every=0, steps=3, lr=1e-2, lncc_window=3, device="cpu", threads=1,
                               cache_dir=os.path.join(out_dir, "cache"))
    out = training.run_training("unsupervised", cfg)
    rank = int(os.environ["RANK"])
    torch.save(out["model"].state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    pairs = []
    import numpy as np
    from app.engine import datasets as D
    for step in range(1, 4):
        p = D.sample_pairs(4, cfg.batch_size * int(os.environ["WORLD_SIZE"]), np.random.default_rng([cfg.seed, step]))
        pairs.append(p[rank])
    with open(os.path.join(out_dir, f"pairs{rank}.txt"), "w") as fh:
        fh.write(repr(pairs))


if __name__ == "__main__":
    main(sys.argv[1])
