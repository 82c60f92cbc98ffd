"""``python -m ppl_vae.experiments.ugvae [options]``: the ``ppl-vae ugvae-experiment`` subcommand."""
from ppl_vae.experiments.ugvae.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
