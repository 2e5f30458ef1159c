"""app.py as tests/test_parallel_server.py launches it under torchrun, unchanged but for two additions for the
test: every video rank 0 saves is also kept exactly, as ``<result stem>.pt`` beside it (the mp4 is lossy), and each
process writes its pid to ``$EASYANIMATE_TEST_PID_DIR/rank<r>.pid`` (so the test can press Ctrl-C on rank 0 alone).

    torchrun --nproc_per_node 2 tests/parallel_server_app.py --ulysses-degree 2 --models-dir ... --port ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from easyanimate.inference.distributed import launched_rank
from easyanimate.ui import app
from easyanimate.ui.generation import Studio

_save = Studio._save


def save_with_tensor(self, generation, kind):
    result = _save(self, generation, kind)
    torch.save(generation.videos, result.path.with_suffix(".pt"))
    return result


if __name__ == "__main__":
    Studio._save = save_with_tensor
    Path(os.environ["EASYANIMATE_TEST_PID_DIR"], f"rank{launched_rank()}.pid").write_text(str(os.getpid()))
    app.main(sys.argv[1:])
