"""When ``regcache`` was first imported (~ the CLI's process start), for the run's phase timings."""

import time

IMPORTED_AT = time.perf_counter()
