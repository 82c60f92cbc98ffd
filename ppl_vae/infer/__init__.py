"""Inference: SVI training (:class:`Trainer`), HMC (:mod:`~ppl_vae.infer.mcmc`), the HMC-refined guide and its
objective, SKSD, evaluation (Peis et al. 2022 §4) and posterior-predictive imputation."""
from ppl_vae.infer.evaluation import evaluate_split, format_table, results_dataset, summarise
from ppl_vae.infer.mcmc import HMCSampler, HMCTrace, StepSizes, leapfrog, run_hmc
from ppl_vae.infer.predictive import PredictiveDraws, impute, impute_frame, predict, sample_predictive
from ppl_vae.infer.potential import PotentialError, TracePotential
from ppl_vae.infer.refined_guide import HMCObjective, HMCRefinedGuide
from ppl_vae.infer.mcmc.sksd import sksd
from ppl_vae.infer.svi import Trainer, load_checkpoint, load_model, save_checkpoint

__all__ = ["Trainer", "load_checkpoint", "load_model", "save_checkpoint", "evaluate_split", "format_table",
           "results_dataset", "summarise", "HMCSampler", "HMCTrace", "StepSizes", "leapfrog", "run_hmc",
           "HMCRefinedGuide", "HMCObjective", "TracePotential", "PotentialError", "sksd", "impute", "impute_frame", "predict",
           "PredictiveDraws", "sample_predictive"]
