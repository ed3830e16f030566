"""Time every attention backend, the fast path and continuous batching on this machine's GPU:
a thin caller of the bench's GPU tables (engine/bench/gpu_tables.py, where the flags are).

    python scripts/gpu_check.py                      # CUDA: bfloat16, lengths 128 … 8000
    python scripts/gpu_check.py --quick              # CPU check of this script: 2 layers, tiny
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.bench.gpu_tables import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
