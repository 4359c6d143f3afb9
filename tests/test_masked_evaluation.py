"""Masked inference as an evaluation setting: the run's policy at test time, one view and an ensemble."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from aclip.config import validate_config
from aclip.errors import ConfigError
from aclip.evaluation.masked import MaskedViews, fold_masked, with_masked_views
from aclip.modules.masking import NoMasking, RandomMasking, ResizeMasking
from aclip.summary.sweep import summarize
from aclip.tasks import train
from tests.test_summarize import make_job, read_csv

TOP1 = "zeroshot/synthetic/top1"


def test_an_ensemble_averages_its_views_unit_embeddings(train_config):
    torch.manual_seed(0)
    module = instantiate(train_config().model)
    model, teacher = module.model.eval(), module.ema_model.vision
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    policy = RandomMasking(0.5)
    with torch.no_grad():
        ensemble = MaskedViews(model, policy, teacher, views=3).encode_image(images, normalize=True)
        generator = torch.Generator().manual_seed(0)  # the first batch's: the views are its draws in turn
        views = [
            model.encode_image(images, policy.select(None, (4, 4), 4, generator=generator), normalize=True)
            for _ in range(3)
        ]
    assert not torch.allclose(views[0], views[1])
    torch.testing.assert_close(ensemble, F.normalize(torch.stack(views).mean(dim=0), dim=-1))


def test_the_masked_models_of_a_batch_share_one_teacher_pass(train_config, monkeypatch):
    module = instantiate(train_config("method=attentive_2x50").model)
    teacher, passes = module.ema_model.vision, []
    scoring = teacher.forward_with_cls_attention
    monkeypatch.setattr(
        teacher, "forward_with_cls_attention", lambda *a, **k: passes.append(1) or scoring(*a, **k)
    )
    models = with_masked_views(module.eval_models(), module.masking, teacher, [1, 2])
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        for name in ("ema@masked1", "online@masked1", "ema@masked2", "online@masked2"):
            models[name].encode_image(images)
    assert len(passes) == 1


def test_masked_figures_sit_beside_the_unmasked_ones_and_a_policy_that_keeps_everything_adds_none(
    train_config,
):
    metrics = {
        "ema": {TOP1: 30.0, "zeroshot/average/reported": 25.0},
        "ema@masked1": {TOP1: 20.0, "zeroshot/average/reported": 15.0},
        "ema@masked4": {TOP1: 24.0},
        "online": {TOP1: 10.0},
        "online@masked1": {TOP1: 5.0},
    }
    folded = fold_masked(metrics)
    assert list(folded) == ["ema", "online"]
    assert sorted(folded["ema"]) == [
        "zeroshot/average/reported",
        "zeroshot/average@masked1/reported",
        TOP1,
        "zeroshot/synthetic@masked1/top1",
        "zeroshot/synthetic@masked4/top1",
    ]
    assert folded["online"] == {TOP1: 10.0, "zeroshot/synthetic@masked1/top1": 5.0}
    module = instantiate(train_config().model)
    models, teacher = module.eval_models(), module.ema_model.vision
    assert with_masked_views(models, NoMasking(), teacher, [1, 4]) == models  # the same figures again
    assert list(with_masked_views(models, ResizeMasking(0.5), teacher, [1])) == [
        "ema",
        "online",
        "ema@masked1",
        "online@masked1",
    ]
    with pytest.raises(ConfigError, match=r"evaluation\.masked\.views must be null or a list of view counts"):
        validate_config(train_config("evaluation.masked.views=[0]"))


def test_masked_inference_reaches_metrics_json_and_the_sweep_summary(train_config, tmp_path):
    """An attentive run evaluated on one and on 3 views its own EMA teacher masks: every figure again
    under the set's name with @masked1 and @masked3, in metrics.json and the sweep summary's tables."""
    cfg = train_config(
        "debug=fast_dev_run",
        "method=attentive_2x50",
        "evaluation.masked.views=[1,3]",
        "evaluation.sets.synthetic.dataset.size=16",
        "evaluation.sets.synthetic_retrieval.dataset.size=8",
    )
    metrics = train(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written.keys() == metrics.keys() == {"ema", "online"}
    for name in ("ema", "online"):
        masked = {key for key in written[name] if "@masked" in key}
        unmasked = set(written[name]) - masked
        assert masked == {
            f"{kind}/{dataset}@masked{n}/{metric}"
            for key in unmasked
            for kind, dataset, metric in [key.split("/", 2)]
            for n in (1, 3)
        }
    sweep = tmp_path / "sweep"
    for number, seed in enumerate((0, 1)):
        make_job(sweep, number, ["method=attentive_2x50", f"seed={seed}"], None)
        (sweep / str(number) / "metrics.json").write_text(json.dumps(written))
    _, paths = summarize(sweep, finished=False)  # the tables (the charts come when a sweep ends)
    assert "ema/zeroshot/synthetic@masked3/top1" in read_csv(paths["csv"])[0]
    assert "ema 0-shot synthetic@masked3 top1" in paths["md"].read_text()
