"""`make bench-checks`: the speeds the tests used to assert (a flaky thing to assert on a busy machine),
as `name: value unit` lines: a rerun of a finished synthetic generation (it must render nothing) and
the refusal of a full-size spec without weights in offline mode (it must not wait on the network)."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def rerun_seconds(root: Path) -> float:
    from competition.synthetic import generate

    kw = dict(preset="tiny", n_patients=3, size=32, seed=5, workers=1, progress=False)
    out = generate(root / "tiny", **kw)
    start = time.perf_counter()
    generate(out, **kw)
    return time.perf_counter() - start


def offline_refusal_seconds(root: Path) -> float:
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf"), TORCH_HOME=str(root / "torch"))
    from level1_models.config import build_config
    from level1_models.modeling import PretrainedWeightsMissing, build_model

    start = time.perf_counter()
    try:
        build_model(build_config("resnet50"), announce=False)
    except PretrainedWeightsMissing:
        return time.perf_counter() - start
    raise SystemExit("bench-checks: resnet50 built offline from nothing; is a weights cache set (HF_HOME)?")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"synthetic_rerun_finished: {rerun_seconds(Path(tmp)):.3f} s", flush=True)
        print(f"offline_missing_weights_refusal: {offline_refusal_seconds(Path(tmp)):.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
