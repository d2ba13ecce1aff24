"""``python -m samoyeds_vllm.convert`` runs ``samoyeds-convert``."""

import sys

from .cli import main

sys.exit(main())
