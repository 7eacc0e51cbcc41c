"""`python -m orchestrator.simulate`: the default protocol beside the original's, printed."""
import sys

from orchestrator.simulate.output import main

sys.exit(main())
