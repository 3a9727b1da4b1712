"""ddnn-server: resumes DDNN inference at the split layer for devices talking MQTT.

OpenBLAS's worker threads busy-wait after every call; with the server's own worker threads
already running forwards in parallel they only burn CPU (measured in docs/performance.md:
~1 core busy at 50 req/s with them, 0.12 core without, and a higher sustained rate). Default
to one BLAS thread unless the user chose otherwise; this must happen before numpy loads.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
