"""`python -m bench [--quick]`: run the overhead benchmark and write bench/results/."""

import os

# Before anything imports litellm: without it, litellm downloads its price map at import.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from bench.run import main

raise SystemExit(main())
