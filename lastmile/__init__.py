"""lastmile: RL fine-tuning without human feedback (arXiv 2408.16753) beside an MLE baseline.

Modules read top-down like the paper: data -> negatives -> modeling -> reward -> ppo -> mle
-> generate -> postprocess -> metrics -> report. Nothing here imports kfp.
"""

__version__ = "0.1.0"
