"""One rank of ``torchrun --nproc-per-node 2 tests/fsdp_uneven_worker.py OUT``: an FSDP-sharded
model validated on a different number of batches per rank inside ``distributed.gathered``
(as a streamed validation split gives each rank its part), then trained on; rank r writes
``OUT/rank<r>.json``. Without ``gathered`` the ranks' forwards would wait for each other."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from kubetrain.core.distributed import init_from_env
from kubetrain.train.distributed import gathered, local_tensor, shard_model


def main(out: Path) -> None:
    ctx = init_from_env(timeout_seconds=30)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    shard_model(model, param_dtype=None, reduce_dtype=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(4, 8)).sum().backward()
    optimizer.step()
    with gathered(model), torch.inference_mode():
        model.eval()
        outputs = [model(torch.ones(2, 8)) for _ in range(1 + 3 * ctx.rank)]  # 1 vs 4 batches
        model.train()
    optimizer.zero_grad()
    model(torch.ones(4, 8)).sum().backward()  # sharded again: collectives line up as before
    optimizer.step()
    out.joinpath(f"rank{ctx.rank}.json").write_text(
        json.dumps(
            {
                "batches": len(outputs),
                "last": outputs[-1][0].tolist(),
                "shard_rows": [local_tensor(p).shape[0] for p in model.parameters()],
            }
        )
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
