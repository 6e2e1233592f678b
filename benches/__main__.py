"""``python -m benches``: run the benchmark harness (see ``benches/run.py --help``)."""

from benches.run import main

raise SystemExit(main())
