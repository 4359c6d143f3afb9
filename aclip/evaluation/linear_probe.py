"""Linear probe: multinomial logistic regression on frozen image embeddings.

The recipe follows CLIP's linear-probe evaluation (L-BFGS logistic regression with the L2 strength chosen
on held-out training data), in torch so that it runs on the evaluation device:

1. hold out `val_fraction` of the training embeddings (a seeded random split);
2. for each weight decay, fit `softmax(W x + b)` by full-batch L-BFGS (strong Wolfe line search) on the
   rest, minimising mean cross-entropy + weight_decay / 2 * ||W||^2, and score top-1 on the held-out part;
3. refit with the best weight decay on all training embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fit_logistic_regression(
    features: Tensor, labels: Tensor, num_classes: int, weight_decay: float, max_iter: int = 1000
) -> nn.Linear:
    """The L2-regularised multinomial logistic regression of `labels` [N] on `features` [N, D]."""
    features = features.float()
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), labels)
        loss = loss + 0.5 * weight_decay * classifier.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier.requires_grad_(False)


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decays: Sequence[float],
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> nn.Linear:
    """Choose the weight decay on a held-out split of the training embeddings, then refit on all of them."""
    if len(weight_decays) > 1:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        order = order.to(features.device)
        num_val = max(1, round(val_fraction * len(labels)))
        val, fit = order[:num_val], order[num_val:]

        def val_accuracy(weight_decay: float) -> float:
            classifier = fit_logistic_regression(
                features[fit], labels[fit], num_classes, weight_decay, max_iter
            )
            return (classifier(features[val].float()).argmax(1) == labels[val]).float().mean().item()

        # max() keeps the first of equal scores: ties go to the weakest regularisation listed first.
        best = max(weight_decays, key=val_accuracy)
    else:
        best = weight_decays[0]
    return fit_logistic_regression(features, labels, num_classes, best, max_iter)
