import gc
import os
import sys

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Spinning threads
# stall every parallel op on a busy machine (SD1.5 extraction at load 12: 13.5 s of CPU → 9 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

gc.freeze()  # the ~170 000 objects of torch's import are never garbage: collections skip them

sys.exit(main(prog="python -m lib_ortholora"))
