"""Evaluation tasks against hand-computed values, and split over two gloo ranks against one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from aclip.datamodules.synthetic import SyntheticClassification, SyntheticRetrieval
from aclip.evaluation import (
    EvalLoaders,
    Evaluation,
    EvaluationError,
    LinearProbe,
    Retrieval,
    ZeroShotClassification,
    evaluate,
    format_table,
)
from aclip.evaluation.distributed import gather_in_order, my_share
from aclip.evaluation.linear_probe import fit_linear_probe, fit_logistic_regression
from aclip.modules.model import ClipModel
from aclip.modules.text import TextTower
from aclip.modules.vision import VisionTower
from aclip.tokenizer import build_tokenizer
from tests.helpers import gloo_world

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourModel(nn.Module):
    """A CLIP stand-in whose embeddings are known: an image's mean colour, a text's colour word.

    Images are embedded as their mean (normalised) RGB value; texts arrive as the RGB vector of the
    colour word they contain (see `colour_tokenize`). A pure red image is nearest to "red", etc.
    """

    embed_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        return F.normalize(images.float().mean(dim=(2, 3)), dim=-1)  # uint8 pixels, as models take them

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        return F.normalize(tokens.float(), dim=-1)


def colour_tokenize(texts: list[str]) -> Tensor:
    vectors = [next(rgb for word, rgb in COLOURS.items() if word in text) for text in texts]
    return torch.tensor(vectors, dtype=torch.float32).reshape(len(texts), 3)


class SolidColours(Dataset):
    """Solid-colour 32 px images; `labels` given makes items (image, label) pairs."""

    def __init__(self, colours: list[str], labels: list[int] | None = None, captions=None) -> None:
        self.colours, self.labels, self.captions = colours, labels, captions

    def __len__(self) -> int:
        return len(self.colours)

    def __getitem__(self, index: int):
        image = Image.new("RGB", (32, 32), COLOURS[self.colours[index]])
        return image if self.labels is None else (image, self.labels[index])


LOADERS = EvalLoaders(image_size=32, batch_size=2, num_workers=0)


def test_zero_shot_hand_computed():
    # Predictions are the image colours: [r, r, g, g, b, r] against labels [r, r, r, g, b, b].
    dataset = SolidColours(["red", "red", "green", "green", "blue", "red"], labels=[0, 0, 0, 1, 2, 2])
    task = ZeroShotClassification(dataset, list(COLOURS), ["a {} thing.", "the colour {}."], name="colours")
    metrics = evaluate(ColourModel(), [task], colour_tokenize, LOADERS)
    assert metrics["zeroshot/colours/top1"] == pytest.approx(100 * 4 / 6)
    # Recall per class: red 2/3, green 1/1, blue 1/2.
    assert metrics["zeroshot/colours/mean_per_class_recall"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    assert "zeroshot/colours/top5" not in metrics  # only 3 classes


def test_mean_per_class_recall_ignores_classes_absent_from_the_set():
    dataset = SolidColours(["red", "green", "red"], labels=[0, 1, 1])  # no blue image
    task = ZeroShotClassification(dataset, list(COLOURS), ["{}"], name="colours")
    metrics = evaluate(ColourModel(), [task], colour_tokenize, LOADERS)
    assert metrics["zeroshot/colours/mean_per_class_recall"] == pytest.approx(100 * (1 + 1 / 2) / 2)


def test_retrieval_multi_caption_hand_computed():
    # Captions, flattened: c0 "blue" (image 0), c1 "red" (image 0), c2 "green" (image 1), c3 "red" (2).
    captions = [["a blue car", "a red car"], ["a green car"], ["a red car"]]
    dataset = SolidColours(["red", "green", "blue"], captions=captions)
    metrics = evaluate(ColourModel(), [Retrieval(dataset, name="cars")], colour_tokenize, LOADERS)
    # Image queries: red -> c1 (tie with c3, lower index first) hit; green -> c2 hit; blue -> c0 miss.
    assert metrics["retrieval/cars/i2t_R@1"] == pytest.approx(100 * 2 / 3)
    # Caption queries: c0 -> blue image (miss), c1 -> red (hit), c2 -> green (hit), c3 -> red (miss).
    assert metrics["retrieval/cars/t2i_R@1"] == pytest.approx(50.0)
    assert metrics["retrieval/cars/i2t_R@5"] == metrics["retrieval/cars/t2i_R@5"] == 100.0


def test_linear_probe_separates_colours():
    train = SolidColours(["red", "green", "blue"] * 4, labels=[0, 1, 2] * 4)
    test = SolidColours(["blue", "red", "green", "red"], labels=[2, 0, 1, 0])
    task = LinearProbe(train, test, weight_decays=[1e-4], name="colours")
    metrics = evaluate(ColourModel(), [task], colour_tokenize, LOADERS)
    assert metrics["linear_probe/colours/top1"] == 100.0
    assert metrics["linear_probe/colours/mean_per_class_recall"] == 100.0


def test_logistic_regression_fits_and_weight_decay_shrinks():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 4, generator=generator)
    labels = (features @ torch.randn(4, 3, generator=generator)).argmax(1)  # 3 linearly separable classes
    weak = fit_logistic_regression(features, labels, 3, weight_decay=1e-5)
    strong = fit_logistic_regression(features, labels, 3, weight_decay=1.0)
    assert (weak(features).argmax(1) == labels).float().mean() > 0.95
    assert strong.weight.norm() < 0.5 * weak.weight.norm()
    # At the optimum the regularised gradient vanishes.
    probe = nn.Linear(4, 3)
    probe.load_state_dict(strong.state_dict())
    loss = F.cross_entropy(probe(features), labels) + 0.5 * probe.weight.square().sum()
    loss.backward()
    assert probe.weight.grad.abs().max() < 1e-3


def test_weight_decay_is_chosen_on_held_out_data():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(200, 2, generator=generator)
    labels = (features[:, 0] > 0).long()
    # An absurd weight decay collapses the classifier to chance; the probe must not pick it.
    classifier = fit_linear_probe(features, labels, 2, weight_decays=[1e3, 1e-4], val_fraction=0.25)
    assert (classifier(features).argmax(1) == labels).float().mean() > 0.95


@pytest.mark.parametrize("bad", [{"weight_decays": []}, {"val_fraction": 1.0}])
def test_linear_probe_rejects_bad_settings(bad):
    dataset = SolidColours(["red"], labels=[0])
    with pytest.raises(ValueError, match=r"evaluation\.sets\.probe"):
        LinearProbe(dataset, dataset, name="probe", **bad)


def test_gather_in_order_is_identity_in_one_process():
    assert my_share(list(range(5))) == [0, 1, 2, 3, 4]
    local = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(gather_in_order(local, 5), local)


# --------------------------------------------------------------------------------------------------
# Two gloo ranks: every task on a real (tiny, random) CLIP model gives the single-process figures.
# Set sizes are odd so that the ranks' shares differ in length.
# --------------------------------------------------------------------------------------------------
WORLD = 2


def tiny_clip() -> ClipModel:
    torch.manual_seed(0)
    vision = VisionTower(image_size=32, patch_size=8, width=32, depth=2, heads=2, output_dim=16)
    text = TextTower(context_length=16, width=32, heads=2, layers=2, output_dim=16)
    return ClipModel(vision, text)


def tasks():
    return [
        ZeroShotClassification(SyntheticClassification(size=27, image_size=32, seed=3), name="shapes"),
        Retrieval(SyntheticRetrieval(size=11, image_size=32, seed=3, captions_per_image=3), name="scenes"),
        LinearProbe(
            SyntheticClassification(size=31, image_size=32, seed=4, split="train"),
            SyntheticClassification(size=13, image_size=32, seed=5),
            weight_decays=[1e-3, 1e-1],
            max_iter=50,
            name="shapes",
        ),
    ]


def run_tasks() -> dict[str, float]:
    loaders = EvalLoaders(image_size=32, batch_size=4, num_workers=0)
    return evaluate(tiny_clip(), tasks(), build_tokenizer(16), loaders)


def rank_metrics(rank: int) -> dict[str, float]:
    torch.set_num_threads(1)
    return run_tasks()


def test_split_over_two_ranks_equals_one_process(tmp_path):
    single = run_tasks()
    results = gloo_world(rank_metrics, tmp_path, world=WORLD)
    for split in results:
        assert split.keys() == single.keys()
        for key, value in single.items():
            assert split[key] == pytest.approx(value, abs=1e-6), key
    assert {"zeroshot/shapes/top5", "retrieval/scenes/t2i_R@10", "linear_probe/shapes/top1"} <= single.keys()


class Unreadable(SolidColours):
    """A set whose item 1 cannot be read (a broken file, as eval_sets raises it)."""

    def __getitem__(self, index: int):
        if index == 1:
            raise OSError("unreadable evaluation image broken.png")
        return super().__getitem__(index)


def test_a_failing_task_is_named_and_the_others_still_reported():
    good = ZeroShotClassification(
        SolidColours(["red", "green"], labels=[0, 1]), list(COLOURS), ["{}"], name="good"
    )
    bad = ZeroShotClassification(
        Unreadable(["red", "green"], labels=[0, 1]), list(COLOURS), ["{}"], name="bad"
    )
    with pytest.raises(
        EvaluationError, match=r"zeroshot/bad: OSError: unreadable evaluation image"
    ) as raised:
        Evaluation([bad, good], LOADERS).run({"model": ColourModel()}, colour_tokenize)
    assert set(raised.value.failures) == {"zeroshot/bad"}
    assert raised.value.metrics["model"]["zeroshot/good/top1"] == 100.0
    assert not any(key.startswith("zeroshot/bad") for key in raised.value.metrics["model"])


def test_table_in_fixed_model_order_with_natural_recalls_chance_and_no_repeated_reported():
    """A CLIPA run reports the online model (listed first): the columns stay ema, online, the reported one
    marked; R@1, R@5, R@10 in that order; the `reported` row, top-1 again, left out and named below."""
    results = {
        "zeroshot/synthetic/top1": 31.9,
        "zeroshot/synthetic/reported": 31.9,
        **{f"retrieval/synthetic/i2t_R@{k}": float(k) for k in (1, 5, 10)},
    }
    metrics = {"online": results, "ema": {**results, "zeroshot/synthetic/top1": 30.5}}
    chance = {"zeroshot/synthetic/top1": 100 / 24}
    lines = format_table(metrics, {"zeroshot/synthetic": "top1"}, chance).splitlines()
    assert lines[0].split() == ["metric", "ema", "online*", "chance"]
    assert [line.split()[0] for line in lines[2:6]] == [
        "retrieval/synthetic/i2t_R@1",
        "retrieval/synthetic/i2t_R@5",
        "retrieval/synthetic/i2t_R@10",
        "zeroshot/synthetic/top1",
    ]
    assert lines[5].split()[1:] == ["30.50", "31.90", "4.17"]
    assert lines[2].split()[-1] == "-"  # no chance level known for retrieval
    assert lines[6].startswith("* the reported model") and lines[7].endswith("synthetic top1")
    assert len(lines) == 8


def test_chance_levels_of_the_zero_shot_sets():
    evaluation = Evaluation(tasks(), EvalLoaders(image_size=32, batch_size=4, num_workers=0))
    assert evaluation.chance_levels() == {  # 24 classes; retrieval and the probe have none listed
        "zeroshot/shapes/top1": pytest.approx(100 / 24),
        "zeroshot/shapes/top5": pytest.approx(500 / 24),
        "zeroshot/shapes/mean_per_class_recall": pytest.approx(100 / 24),
    }
