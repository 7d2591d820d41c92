"""``python -m benchmarks.throughput``: see ``benchmarks.throughput.main``."""

from benchmarks.throughput.main import main

raise SystemExit(main())
