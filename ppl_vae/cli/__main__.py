"""``python -m ppl_vae.cli ...``: the same as the ``ppl-vae`` console script (exit status of :func:`main`)."""
import sys

from ppl_vae.cli import main

sys.exit(main())
