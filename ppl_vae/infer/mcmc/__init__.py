"""HMC as small pure tensor functions on a state record (integrator, kernel, tuning, SKSD), composed like
BlackJAX/NumPyro kernels: the integrator is passed to the kernel; adaptation is separate and composes."""
from ppl_vae.infer.mcmc.integrators import GradFn, kinetic_energy, leapfrog, value_and_grad_fn
from ppl_vae.infer.mcmc.kernel import HMCInfo, HMCKernel, HMCState, HMCTrace, hmc_step, run_hmc
from ppl_vae.infer.mcmc.sksd import median_bandwidth, sksd
from ppl_vae.infer.mcmc.tuning import (SCHEMES, HMCSampler, StepSizes, acceptance_floor_loss, adapt_scale,
                                       backoff_step_sizes, expected_squared_change, step_size_loss)

__all__ = ["GradFn", "kinetic_energy", "leapfrog", "value_and_grad_fn", "HMCInfo", "HMCKernel", "HMCState",
           "HMCTrace", "hmc_step", "run_hmc", "median_bandwidth", "sksd", "HMCSampler", "StepSizes", "SCHEMES",
           "acceptance_floor_loss", "adapt_scale", "backoff_step_sizes", "expected_squared_change",
           "step_size_loss"]
