import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EASYANIMATE_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"
KEYS = SHARED / "reference" / "keys"

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Tests compute in fp32 on every CPU (tolerances follow from fp32), also in the processes they launch; the automatic
# bf16 choice on CPUs with bf16 instructions is tested on its own (tests/test_pipeline.py).
os.environ["EASYANIMATE_CPU_DTYPE"] = "float32"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread: tiny convolutions on the shared 2-core machine are several
    times faster without oversubscription (use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden vectors produced by the original implementation (../shared/reference/golden)."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN} (set EASYANIMATE_SHARED to the shared/ folder)")
    return GOLDEN


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    """The released state-dict key manifests (../shared/reference/keys)."""
    if not KEYS.is_dir():
        pytest.skip(f"key manifests not found at {KEYS} (set EASYANIMATE_SHARED to the shared/ folder)")
    return KEYS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny model folder in the released layout, built once per test session
    (``easyanimate.demo.tiny_model.build_tiny_model``; seed 0)."""
    from easyanimate.demo.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model") / "EasyAnimateV4-tiny"
    build_tiny_model(out, seed=0)
    return out
