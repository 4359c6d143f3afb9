"""Tests for retrieval recall and zero-shot classifier weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from aclip.modules.metrics import retrieval_recall, zero_shot_weights

# --------------------------------------------------------------------------------------------------
# Hand-worked retrieval example: 3 images, 5 captions, text_to_image = [0, 0, 1, 2, 2].
# Similarity matrix S[image, caption] (rows: images, columns: captions t0..t4):
#
#             t0     t1     t2     t3     t4
#   img0     0.1    0.4    0.5    0.0   -0.1
#   img1     0.3    0.2    0.1    0.4    0.0
#   img2    -0.2    0.0    0.2    0.1    0.45
#
# Image -> text (rank of the best-ranked caption of the image, 1-based):
#   img0: order t2 t1 t0 t3 t4; its captions t0, t1 sit at ranks 3 and 2 -> rank 2 (any caption counts)
#   img1: order t3 t0 t1 t2 t4; its caption t2 sits at rank 4            -> rank 4
#   img2: order t4 t2 t3 t1 t0; its captions t4, t3 sit at ranks 1 and 3 -> rank 1 (its 2nd caption)
#   i2t ranks [2, 4, 1] -> R@1 = 1/3, R@2 = 2/3, R@3 = 2/3, R@4 = 3/3, R@5 = 3/3
# Text -> image (rank of the caption's image):
#   t0 (img0): column [0.1, 0.3, -0.2]  -> order img1 img0 img2 -> rank 2
#   t1 (img0): column [0.4, 0.2, 0.0]   -> order img0 img1 img2 -> rank 1
#   t2 (img1): column [0.5, 0.1, 0.2]   -> order img0 img2 img1 -> rank 3
#   t3 (img2): column [0.0, 0.4, 0.1]   -> order img1 img2 img0 -> rank 2
#   t4 (img2): column [-0.1, 0.0, 0.45] -> order img2 img1 img0 -> rank 1
#   t2i ranks [2, 1, 3, 2, 1] -> R@1 = 2/5, R@2 = 4/5, R@3 = 5/5
# Features realising S exactly with unit norms: images are e0, e1, e2 in R^4 and caption t is
# (S[0, t], S[1, t], S[2, t], sqrt(1 - sum of squares)).
# --------------------------------------------------------------------------------------------------

SIMILARITY = torch.tensor(
    [
        [0.1, 0.4, 0.5, 0.0, -0.1],
        [0.3, 0.2, 0.1, 0.4, 0.0],
        [-0.2, 0.0, 0.2, 0.1, 0.45],
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def hand_features():
    images = torch.eye(3, 4)
    columns = SIMILARITY.T  # [5, 3]
    filler = (1 - (columns**2).sum(1, keepdim=True)).sqrt()
    texts = torch.cat([columns, filler], dim=1)
    return images, texts


def test_hand_features_realise_the_similarity_matrix():
    images, texts = hand_features()
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(images @ texts.T, SIMILARITY)


def test_retrieval_recall_hand_worked_example():
    images, texts = hand_features()
    metrics = retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(1, 2, 3, 4, 5))
    expected = {
        "i2t_R@1": 100 / 3,
        "i2t_R@2": 200 / 3,
        "i2t_R@3": 200 / 3,
        "i2t_R@4": 100.0,
        "i2t_R@5": 100.0,
        "t2i_R@1": 40.0,
        "t2i_R@2": 80.0,
        "t2i_R@3": 100.0,
        "t2i_R@4": 100.0,
        "t2i_R@5": 100.0,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-4), key


def test_ks_argument_is_respected():
    images, texts = hand_features()
    metrics = retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(2,))
    assert set(metrics) == {"i2t_R@2", "t2i_R@2"}
    assert metrics["i2t_R@2"] == pytest.approx(200 / 3, abs=1e-4)
    assert metrics["t2i_R@2"] == pytest.approx(80.0, abs=1e-4)

    default = retrieval_recall(images, texts, TEXT_TO_IMAGE)
    assert set(default) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert default["i2t_R@1"] == pytest.approx(100 / 3, abs=1e-4)
    assert default["t2i_R@1"] == pytest.approx(40.0, abs=1e-4)
    assert default["i2t_R@10"] == default["t2i_R@10"] == pytest.approx(100.0)


def test_any_caption_of_an_image_counts_for_image_to_text():
    """Image 0 has two captions; only its second one is nearest -> still a hit at R@1."""
    images = torch.eye(2)
    texts = F.normalize(torch.tensor([[0.2, 1.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    # img0 similarities: t0=0.196, t1=1.0, t2=0 -> nearest is t1, a caption of img0.
    # img1 similarities: t0=0.98, t1=0, t2=1.0 -> nearest is t2, its caption.
    text_to_image = torch.tensor([0, 0, 1])
    metrics = retrieval_recall(images, texts, text_to_image, ks=(1,))
    assert metrics["i2t_R@1"] == pytest.approx(100.0)
    # t0 (img0) prefers img1 -> miss; t1 and t2 hit.
    assert metrics["t2i_R@1"] == pytest.approx(200 / 3, abs=1e-4)


def test_retrieval_is_perfect_for_identical_features():
    features = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    metrics = retrieval_recall(features, features, torch.arange(6), ks=(1,))
    assert metrics == {"i2t_R@1": pytest.approx(100.0), "t2i_R@1": pytest.approx(100.0)}
    shifted = retrieval_recall(features, features, torch.arange(6).roll(1), ks=(1,))
    assert shifted == {"i2t_R@1": pytest.approx(0.0), "t2i_R@1": pytest.approx(0.0)}


@pytest.mark.parametrize(
    "text_to_image",
    [
        torch.tensor([0, 0, 1, 2]),  # too short
        torch.tensor([[0], [0], [1], [2], [2]]),  # 2-D
        torch.tensor([0, 0, 1, 2, 3]),  # image index out of range
        torch.tensor([0, -1, 1, 2, 2]),  # negative index
    ],
)
def test_bad_text_to_image_raises(text_to_image):
    images, texts = hand_features()
    with pytest.raises(ValueError):
        retrieval_recall(images, texts, text_to_image)


# --------------------------------------------------------------------------------------------------
# zero_shot_weights
# --------------------------------------------------------------------------------------------------

CLASSNAMES = ["cat", "dog", "red circle"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{}"]
DIM = 8


def fake_encoder():
    """Deterministic encoder: one fixed random vector per prompt string, with very different norms."""
    generator = torch.Generator().manual_seed(0)
    prompts = [t.format(c) for c in CLASSNAMES for t in TEMPLATES]
    table = {
        prompt: torch.randn(DIM, generator=generator, dtype=torch.float64) * (1 + 10 * i)
        for i, prompt in enumerate(prompts)
    }
    calls = []

    def encode_texts(batch):
        calls.append(list(batch))
        return torch.stack([table[prompt] for prompt in batch])

    return table, encode_texts, calls


def test_zero_shot_weights_shape_and_unit_columns():
    _, encode, _ = fake_encoder()
    weights = zero_shot_weights(encode, CLASSNAMES, TEMPLATES)
    assert weights.shape == (DIM, len(CLASSNAMES))
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(len(CLASSNAMES), dtype=torch.float64))


def test_zero_shot_weights_equal_prompt_ensemble_by_hand():
    table, encode, calls = fake_encoder()
    weights = zero_shot_weights(encode, CLASSNAMES, TEMPLATES)
    assert sorted(p for call in calls for p in call) == sorted(table)
    for c, name in enumerate(CLASSNAMES):
        per_template = [F.normalize(table[t.format(name)], dim=0) for t in TEMPLATES]
        expected = F.normalize(torch.stack(per_template).mean(0), dim=0)
        torch.testing.assert_close(weights[:, c], expected)
        # Without the per-prompt normalisation the result differs (the norms differ a lot).
        unnormalised = F.normalize(torch.stack([table[t.format(name)] for t in TEMPLATES]).mean(0), dim=0)
        assert not torch.allclose(weights[:, c], unnormalised, atol=1e-3)


def test_zero_shot_weights_single_template_is_normalised_embedding():
    table, encode, _ = fake_encoder()
    weights = zero_shot_weights(encode, CLASSNAMES, ["{}"])
    for c, name in enumerate(CLASSNAMES):
        torch.testing.assert_close(weights[:, c], F.normalize(table[name], dim=0))


def test_zero_shot_weights_classify_their_own_prompts():
    table, encode, _ = fake_encoder()
    weights = zero_shot_weights(encode, CLASSNAMES, ["{}"])
    queries = F.normalize(torch.stack([table[name] for name in CLASSNAMES]), dim=-1)
    assert (queries @ weights).argmax(dim=1).tolist() == list(range(len(CLASSNAMES)))
    assert math.isclose((queries @ weights).diagonal().min().item(), 1.0, rel_tol=1e-9)


def test_zero_shot_weights_empty_templates_raise():
    _, encode, _ = fake_encoder()
    with pytest.raises(ValueError):
        zero_shot_weights(encode, CLASSNAMES, [])
