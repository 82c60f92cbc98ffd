"""Inference: SVI training (:class:`Trainer`), evaluation (METHODS §8)."""
from ppl_vae.inference.evaluation import evaluate_split, format_table, results_dataset, summarise
from ppl_vae.inference.svi import Trainer, load_checkpoint, load_model, save_checkpoint

__all__ = ["Trainer", "load_checkpoint", "load_model", "save_checkpoint", "evaluate_split", "format_table",
           "results_dataset", "summarise"]
