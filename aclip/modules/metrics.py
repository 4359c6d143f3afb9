"""Metrics of embeddings: zero-shot classifier weights and image-text retrieval recall (the evaluation's,
`aclip.evaluation.tasks`, and a public API of their own)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def retrieval_recall(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k of image-to-text and text-to-image retrieval, in percent.

    `image_features` [N_img, D] and `text_features` [N_txt, D] are L2-normalised; `text_to_image[t]`
    is the index of the image that caption t describes (an image may have several captions).
    An image query is a hit at k when any of its captions is among its k nearest captions; a caption
    query is a hit when its image is among its k nearest images. Ties are broken by index order.
    """
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must have shape ({n_texts},), got {tuple(text_to_image.shape)}")
    if n_texts and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image holds indices outside [0, {n_images})")
    text_to_image = text_to_image.to(image_features.device)
    similarity = image_features.float() @ text_features.float().T  # [N_img, N_txt]

    # Rank of the best-ranked matching caption for every image (0 = first).
    order_i2t = similarity.argsort(dim=1, descending=True, stable=True)
    is_match = text_to_image[order_i2t] == torch.arange(n_images, device=similarity.device)[:, None]
    first_hit_i2t = torch.where(is_match, torch.arange(n_texts, device=similarity.device), n_texts).amin(1)

    # Rank of the matching image for every caption.
    order_t2i = similarity.T.argsort(dim=1, descending=True, stable=True)
    first_hit_t2i = (order_t2i == text_to_image[:, None]).int().argmax(dim=1)

    metrics = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = 100.0 * (first_hit_i2t < k).float().mean().item()
        metrics[f"t2i_R@{k}"] = 100.0 * (first_hit_t2i < k).float().mean().item()
    return metrics


def zero_shot_weights(
    encode_texts: Callable[[list[str]], Tensor], classnames: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """Prompt-ensemble classifier [D, C]: per class, encode every template, normalise, average, normalise.

    `templates` are format strings with one `{}` for the class name; `encode_texts` maps a list of
    strings to their embeddings [N, D].
    """
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    prompts = [template.format(name) for name in classnames for template in templates]
    features = F.normalize(encode_texts(prompts), dim=-1)
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T
