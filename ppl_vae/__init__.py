"""ppl_vae: advanced variational autoencoders as Pyro probabilistic programs.

Declare a latent structure as a Pyro model/guide pair, train it with SVI (:class:`Trainer`), refine its guide with
Hamiltonian Monte Carlo whose step sizes are learned by gradient, impute missing values, predict targets, and
diagnose the chains with ArviZ. See README.md for the tour and ``ppl-vae --help`` for the command line.
"""
from ppl_vae.data import from_csv, from_dataframe, list_datasets, load_dataset
from ppl_vae.diagnostics import summary as diagnostics_summary, to_arviz
from ppl_vae.infer import HMCRefinedGuide, HMCSampler, Trainer, evaluate_split, load_model
from ppl_vae.infer.frames import TrainedModel, impute, load_trained, predict, sample_frame
from ppl_vae.threads import set_threads, small_work_threads
from ppl_vae.models import MODELS, VAE, VAEM, Batch, LatentVariableModel, TrainingStage, build_model

__version__ = "0.1.0"

__all__ = ["Batch", "LatentVariableModel", "TrainingStage", "VAE", "VAEM", "MODELS", "build_model", "Trainer",
           "evaluate_split", "load_model", "load_dataset", "list_datasets", "from_dataframe", "from_csv",
           "HMCRefinedGuide", "HMCSampler", "impute", "predict", "to_arviz", "diagnostics_summary",
           "TrainedModel", "load_trained", "sample_frame", "set_threads", "small_work_threads"]
