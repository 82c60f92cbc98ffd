"""Models of partially observed, mixed-type tables with an optional target (VAE, VAEM and their HMC-refined
variants)."""
