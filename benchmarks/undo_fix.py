"""Run train.py with one of the training-dynamics fixes undone, to measure what the fix changed.

    python benchmarks/undo_fix.py bn-stats -- train.py --init base.pt --mvc --seed 0 ...
    python benchmarks/undo_fix.py memory -- train.py --stage refiner --init trk.pt --mvc ...

Everything else is the unchanged train.py of the tree the given train.py lives in, so a run with a
fix undone pairs with the same command run normally (same seed, data order and mask draws):

    bn-stats  the MVC masked pass updates BatchNorm running statistics (as before the fix; the fix
              is ``vss.mvc.batch_norm_statistics_kept``)
    memory    the stage-3 MVC masked pass reads the class memory including the clean pass's own
              clip, and pushes its embeddings again (as before the fix; ``vss.video_model``)
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
import runpy
import sys


def undo_bn_stats() -> None:
    import vss.mvc

    vss.mvc.batch_norm_statistics_kept = lambda module: contextlib.nullcontext()


def undo_memory() -> None:
    import vss.video_model

    refiner_loss = vss.video_model.refiner_loss

    def as_clean_pass(*args, masked: bool = False, **kwargs):
        return refiner_loss(*args, masked=False, **kwargs)

    vss.video_model.refiner_loss = as_clean_pass


UNDO = {"bn-stats": undo_bn_stats, "memory": undo_memory}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fix", choices=sorted(UNDO), help="the fix to undo")
    p.add_argument("train", type=Path, help="the train.py to run (its folder is the code used)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="train.py's arguments")
    args = p.parse_args()
    sys.path.insert(0, str(args.train.resolve().parent))
    UNDO[args.fix]()
    sys.argv = [str(args.train), *(a for a in args.args if a != "--")]
    runpy.run_path(str(args.train), run_name="__main__")


if __name__ == "__main__":
    main()
