"""Helpers shared by the multi-process tests."""

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# train.py under torchrun where every rank writes its own checkpoint (last.pt.rank<r>), so a test
# can compare the ranks' states.
_DDP_TRAIN_WRAPPER = """
import sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import train
save = train.save_checkpoint
train.is_main = lambda: True  # every rank writes its own checkpoint (test only)
train.save_checkpoint = lambda path, state: save(f"{{path}}.rank{{dist.get_rank()}}", state)
sys.exit(train.main(sys.argv[1:]))
"""


def free_port() -> int:
    """A free TCP port on the loopback interface for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ddp_train_wrapper(path: Path) -> Path:
    """Write the per-rank-checkpoint train.py wrapper to `path` and return it."""
    path.write_text(_DDP_TRAIN_WRAPPER.format(repo=str(REPO)))
    return path
