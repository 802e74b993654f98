"""One process of the 2-process runs in test_distributed.py (started by torch.multiprocessing.spawn).

Each process gets the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and starts
one gloo process group from them, which every `surgeon.finetune` call below uses (a script of the user's
under torchrun may do the same; the CLI test lets `finetune` start the group itself). It runs:
1. `whole`: the settings of test_distributed.SETTINGS, uninterrupted, writing a run folder;
2. `cut`: the same, killed in the middle of its second epoch, then resumed;
3. a Dataset of one sample (fewer samples than processes);
4. a model with a trainable parameter that its forward does not use (DDP must be told).
and leaves in OUT: rank{R}.pt (final weights per run), rank{R}.json (write_run calls, histories, errors).
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).parent))


def main(rank: int, world_size: int, port: int, out: str) -> None:
    import surgeon
    from surgeon.errors import SurgeonError
    from surgeon.training import runs
    from test_distributed import SETTINGS, data, patched
    from test_training import Interrupting  # each process reads as many samples: all stop at the same point

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(minutes=5))  # a broken test fails, not hangs
    out = Path(out)
    writes = []
    write_run = runs.write_run

    def counting(*args, **kwargs):
        writes.append(str(args[1]))
        return write_run(*args, **kwargs)

    runs.write_run = counting
    train, val = data()
    report: dict = {"rank": rank}

    whole = surgeon.finetune(patched(), train, val, out=out / "whole", **SETTINGS)
    report["whole"] = whole.history
    report["draw"] = torch.rand(1).item()  # where this process's random stream stands after the run
    try:  # killed in the middle of epoch 2 (32 samples per process and epoch)
        surgeon.finetune(patched(), Interrupting(train, 32 + 20), val, out=out / "cut", **SETTINGS)
    except KeyboardInterrupt:
        report["cut_epochs"] = len(runs.read_metrics(out / "cut"))
    again = surgeon.finetune(patched(seed=7), train, val, out=out / "cut", resume=True, **SETTINGS)
    report["again"] = again.history
    try:
        surgeon.finetune(patched(), Subset(train, [0]), epochs=1, lr=1e-3, progress=False)
    except SurgeonError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    spare = patched()
    spare.spare = torch.nn.Parameter(torch.zeros(3))  # trains, but no forward uses it
    before = spare.stem[0].weight.detach().clone()
    surgeon.finetune(spare, train, epochs=1, lr=1e-3, batch_size=8, progress=False)
    report["spare"] = [bool(spare.spare.abs().sum() == 0), bool(not torch.equal(before, spare.stem[0].weight))]
    report["writes"] = writes
    torch.save({"whole": whole.model.state_dict(), "again": again.model.state_dict()}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()
