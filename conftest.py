"""Repository-wide pytest set-up: notebooks (run by nbmake) and tests run in smoke mode on the CPU."""
import os

os.environ.setdefault("PPL_VAE_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
