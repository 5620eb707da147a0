"""Write tests/data/dvis_plus_tracker_subset.npz: the part of the DVIS++ fixture that the tests
can carry in the repository (~2.4 MB of the 15 MB file).

The full fixture ``dvis_plus_official.npz`` (made by running the original DVIS_Plus code, see
the ``meta`` entry it carries) lives outside the repository; the subset keeps the referring
tracker's weights and part C (crafted segmenter outputs whose queries are permuted from frame to
frame; the tracker's outputs and slot indices, and the online VSS label map), so the tracker,
its Hungarian alignment and the online post-processing are checked against the original code on
every clone. The values are copied unchanged.

    python tests/data/make_dvis_subset.py ../shared/fixtures/dvis_plus_official.npz
"""

import argparse
import json
from pathlib import Path

import numpy as np

KEEP_PREFIXES = ("sd/tracker.", "c/in/", "c/trk/", "c/vss_on/")
KEEP_KEYS = ("in/img_size", "in/first_resize_size", "in/out_hw")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fixture", type=Path, help="dvis_plus_official.npz")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "dvis_plus_tracker_subset.npz")
    args = p.parse_args()
    z = np.load(args.fixture)
    meta = json.loads(z["meta"].item())
    keep = {k: z[k] for k in z.keys() if k.startswith(KEEP_PREFIXES) or k in KEEP_KEYS}
    subset_meta = {"source": f"{args.fixture.name}, keys {KEEP_PREFIXES + KEEP_KEYS}",
                   **{k: meta[k] for k in ("what", "repos", "config", "dims", "tolerance")}}
    keep["meta"] = np.array(json.dumps(subset_meta))
    np.savez_compressed(args.out, **keep)
    print(f"{args.out}: {len(keep)} arrays, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
