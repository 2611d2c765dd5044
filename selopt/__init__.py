"""selopt: selective AdamW optimizers against catastrophic forgetting.

>>> import torch, selopt
>>> model = torch.nn.Linear(16, 16)
>>> opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.01, fraction=0.15), lr=1e-4)
"""

from selopt.groups import param_groups
from selopt.optim import AdamW, MoFO
from selopt.soft_masks import strip_soft_masks
from selopt.state import fp32_moments
from selopt.wrappers import unwrap
from selopt import cofi, hft, stats

__all__ = ["AdamW", "MoFO", "fp32_moments", "param_groups", "strip_soft_masks", "unwrap"]
__version__ = "0.1.0"
