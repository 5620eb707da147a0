"""vss.distributed: single-process fallbacks and a real 2-process gloo run (the
collective returns a new tensor, the caller assigns it, and the summed confusion matrix equals
the single-process one)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vss import distributed as vd

NUM_CLASSES = 5


def confusion(target: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    keep = target < k
    return torch.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def shared_labels() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, NUM_CLASSES + 1, (7, 9), generator=g)  # value K plays "ignore"
    pred = torch.randint(0, NUM_CLASSES, (7, 9), generator=g)
    return target, pred


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    info = vd.init_distributed("cpu")
    try:
        assert info.enabled and info.rank == rank and info.world_size == world
        assert vd.is_main() == (rank == 0)
        # The caller's tensor is untouched; the result is the sum.
        t = torch.full((2, 3), rank + 1, dtype=torch.int64)
        summed = vd.all_reduce_sum(t)
        assert torch.equal(t, torch.full((2, 3), rank + 1, dtype=torch.int64))
        assert torch.equal(summed, torch.full((2, 3), 3, dtype=torch.int64))
        # Each rank counts its share of the rows; the all-reduced matrix is the global one.
        target, pred = shared_labels()
        cm = confusion(target[rank::world].flatten(), pred[rank::world].flatten(), NUM_CLASSES)
        cm = vd.all_reduce_sum(cm)
        # Variable first dims: rank 0 sends 2 rows, rank 1 sends 3.
        rows = torch.arange((rank + 2) * 4, dtype=torch.float32).reshape(rank + 2, 4) + 100 * rank
        gathered = vd.all_gather_cat(rows)
        objects = vd.all_gather_object({"rank": rank})
        shared = vd.broadcast_object("from-0" if rank == 0 else "other")
        torch.save(
            {"cm": cm, "gathered": gathered, "objects": objects, "shared": shared},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        vd.barrier()
    finally:
        vd.cleanup()


def test_two_process_gloo(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    target, pred = shared_labels()
    expected_cm = confusion(target.flatten(), pred.flatten(), NUM_CLASSES)
    expected_rows = torch.cat(
        [
            torch.arange(8, dtype=torch.float32).reshape(2, 4),
            torch.arange(12, dtype=torch.float32).reshape(3, 4) + 100,
        ]
    )
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(res["cm"], expected_cm)
        assert torch.equal(res["gathered"], expected_rows)
        assert res["objects"] == [{"rank": 0}, {"rank": 1}]
        assert res["shared"] == "from-0"


def test_single_process_fallbacks(monkeypatch, capsys):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = vd.init_distributed("cpu")
    assert info == vd.DistInfo(False, 0, 0, 1, torch.device("cpu"))
    assert vd.is_main() and vd.get_world_size() == 1
    t = torch.arange(4)
    out = vd.all_reduce_sum(t)
    assert torch.equal(out, t) and out.data_ptr() != t.data_ptr()  # a new tensor
    out += 1
    assert torch.equal(t, torch.arange(4))
    assert torch.equal(vd.all_gather_cat(t), t)
    assert vd.all_gather_object(3) == [3] and vd.broadcast_object("x") == "x"
    vd.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    vd.barrier()
    vd.cleanup()


def test_bad_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        vd.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        vd.init_distributed("cpu")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="device_pref"):
        vd.init_distributed("tpu")
