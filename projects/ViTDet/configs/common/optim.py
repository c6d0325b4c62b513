# The three optimizers of the OFAT study, with its hyper-parameters.
import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(base_lr="${..lr}", weight_decay_norm=0.0),
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
SGD = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=1e-3,
    momentum=0.9,
    weight_decay=1e-4,
)
RMSprop = L(torch.optim.RMSprop)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=1e-3,
    alpha=0.99,
    eps=1e-8,
    weight_decay=1e-4,
)
