"""Models of images and grouped data (UG-VAE and its baselines β-VAE, GMVAE, ML-VAE)."""
