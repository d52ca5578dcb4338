"""ifw.runner"""

import os

# Set before torch loads its OpenMP runtime (the runtime reads it once): waiting threads sleep
# instead of spinning. Spinning threads on a busy or CPU-limited node (a pod's CFS quota, the
# processes beside it) stall each other: 37 s of speech through tiny.en with 2 threads took 267 s
# spinning, 45 s sleeping and 81 s on one thread on this 2-core machine under load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
