"""Helpers shared by the tests: the scripts' entry points, and the torchrun wrapper."""

from pathlib import Path
import runpy

REPO = Path(__file__).resolve().parents[1]


def script_main(name: str):
    """The ``main(argv) -> exit code`` of a top-level script (train.py, infer.py, evaluate.py), run
    in this process as the command line would run it (the script is executed, not imported as a
    module, so tests reach it only through its command line)."""
    return runpy.run_path(str(REPO / name), run_name=f"{Path(name).stem}_script")["main"]


# train.py under torchrun where every rank writes its own checkpoint (last.pt.rank<r>), so a test
# can compare the ranks' states.
_DDP_TRAIN_WRAPPER = """
import runpy, sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import vss.checkpoint as ckpt
save = ckpt.save_checkpoint
ckpt.is_main = lambda: True  # every rank writes its own checkpoint (test only)
ckpt.save_checkpoint = lambda path, state: save(f"{{path}}.rank{{dist.get_rank()}}", state)
sys.exit(runpy.run_path({train!r}, run_name="train_script")["main"](sys.argv[1:]))
"""


def write_ddp_train_wrapper(path: Path) -> Path:
    """Write the per-rank-checkpoint train.py wrapper to `path` and return it."""
    path.write_text(_DDP_TRAIN_WRAPPER.format(repo=str(REPO), train=str(REPO / "train.py")))
    return path


def train_args(setup: dict, out, *extra) -> list[str]:
    """train.py arguments of a quick test run: the setup's config and data, OUT, no workers, a log
    line every step, no validation, then EXTRA."""
    return [
        "--config",
        str(setup["config"]),
        "--data",
        str(setup["data"]),
        "--out",
        str(out),
        "--workers",
        "0",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        *map(str, extra),
    ]
