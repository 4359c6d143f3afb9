"""Class names and prompt templates for zero-shot classification: every kind of spec, and bad input."""

from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES

from aclip.datamodules.synthetic import CLASSNAMES, PROMPT_TEMPLATES, SyntheticClassification
from aclip.evaluation.prompts import load_classnames, load_templates

FOLDERS = SimpleNamespace(classes=["apple_pie", "sea_lion", "zebra"])


def test_classnames_default_to_the_dataset_or_its_folder_names():
    assert load_classnames(None, SyntheticClassification(size=1)) == list(CLASSNAMES)
    assert load_classnames(None, FOLDERS) == ["apple pie", "sea lion", "zebra"]
    with pytest.raises(ValueError, match="set classnames"):
        load_classnames(None, SimpleNamespace())


def test_classnames_from_a_list_and_open_clip_imagenet():
    assert load_classnames(("pie", "lion", "horse"), FOLDERS) == ["pie", "lion", "horse"]
    imagenet = load_classnames("imagenet", SimpleNamespace(classes=[f"n{i:08d}" for i in range(1000)]))
    assert len(imagenet) == 1000
    assert imagenet == list(IMAGENET_CLASSNAMES)


def test_classnames_from_files(tmp_path):
    txt = tmp_path / "names.txt"
    txt.write_text("apple pie\n\n  sea lion  \nzebra\n")
    assert load_classnames(str(txt), FOLDERS) == ["apple pie", "sea lion", "zebra"]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(["pie", "lion", "horse"]))
    assert load_classnames(as_list, FOLDERS) == ["pie", "lion", "horse"]
    by_folder = tmp_path / "by_folder.json"
    by_folder.write_text(json.dumps({"zebra": "striped horse", "apple_pie": "pie", "sea_lion": "lion"}))
    assert load_classnames(str(by_folder), FOLDERS) == ["pie", "lion", "striped horse"]


def test_classnames_count_must_match_the_classes(tmp_path):
    txt = tmp_path / "names.txt"
    txt.write_text("apple pie\nzebra\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(txt))}.* 2 names.* 3 classes"):
        load_classnames(str(txt), FOLDERS)
    with pytest.raises(ValueError, match=r"1000 names.* 3 classes"):
        load_classnames("imagenet", FOLDERS)


def test_bad_classname_specs(tmp_path):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"zebra": "zebra"}))
    with pytest.raises(ValueError, match=r"no class name for the folders \['apple_pie', 'sea_lion'\]"):
        load_classnames(str(partial), FOLDERS)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_classnames(str(tmp_path / "missing.txt"), FOLDERS)
    with pytest.raises(ValueError, match="classnames must be null, 'imagenet'"):
        load_classnames("imagenet21k", FOLDERS)
    with pytest.raises(TypeError, match="list of strings"):
        load_classnames([1, 2, 3], FOLDERS)


def test_templates_default_to_the_dataset():
    assert load_templates(None, SyntheticClassification(size=1)) == list(PROMPT_TEMPLATES)
    with pytest.raises(ValueError, match="set templates"):
        load_templates(None, FOLDERS)


def test_open_clip_templates_become_format_strings():
    openai = load_templates("openai", FOLDERS)
    assert len(openai) == 80
    assert all(template.count("{}") == 1 for template in openai)
    assert "a photo of a {}." in openai
    assert load_templates("simple", FOLDERS) == [template("{}") for template in SIMPLE_IMAGENET_TEMPLATES]


def test_templates_from_a_list_and_files(tmp_path):
    assert load_templates(["a {}.", "the {}!"], FOLDERS) == ["a {}.", "the {}!"]
    txt = tmp_path / "templates.txt"
    txt.write_text("a photo of a {}.\n\nart of the {}.\n")
    assert load_templates(str(txt), FOLDERS) == ["a photo of a {}.", "art of the {}."]
    as_json = tmp_path / "templates.json"
    as_json.write_text(json.dumps(["a {}."]))
    assert load_templates(str(as_json), FOLDERS) == ["a {}."]


@pytest.mark.parametrize("template", ["a photo.", "a {} of a {}.", "a {c}.", "a {0}.", "a {!r}.", "a {."])
def test_template_needs_exactly_one_empty_field(template):
    with pytest.raises(ValueError, match=re.escape(repr(template))):
        load_templates(["a {}.", template], FOLDERS)


def test_no_templates_is_an_error():
    with pytest.raises(ValueError, match="no templates"):
        load_templates([], FOLDERS)


def test_clip_benchmark_spec_without_the_package_says_how_to_install(monkeypatch):
    # None in sys.modules makes importing a module fail, whether or not it is installed.
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)
    monkeypatch.setitem(sys.modules, "clip_benchmark.datasets", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'aclip[benchmark]'")):
        load_classnames("clip_benchmark:pets", FOLDERS)
    with pytest.raises(ImportError, match=re.escape("pip install 'aclip[benchmark]'")):
        load_templates("clip_benchmark:pets", FOLDERS)


@pytest.fixture
def fake_clip_benchmark(tmp_path, monkeypatch):
    """A stand-in clip_benchmark package holding the two JSON files the loaders read."""
    datasets = tmp_path / "clip_benchmark" / "datasets"
    datasets.mkdir(parents=True)
    (datasets.parent / "__init__.py").touch()
    (datasets / "__init__.py").touch()
    (datasets / "en_classnames.json").write_text(json.dumps({"toys": ["ball", "kite", "yo-yo"]}))
    templates = {"toys": ["a photo of a {c}.", "a {c} toy."]}
    (datasets / "en_zeroshot_classification_templates.json").write_text(json.dumps(templates))
    names = ("clip_benchmark", "clip_benchmark.datasets")
    for name in names:  # an installed clip_benchmark must not shadow the fake
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in names:
        sys.modules.pop(name, None)


@pytest.mark.usefixtures("fake_clip_benchmark")
def test_clip_benchmark_entries():
    assert load_classnames("clip_benchmark:toys", FOLDERS) == ["ball", "kite", "yo-yo"]
    assert load_templates("clip_benchmark:toys", FOLDERS) == ["a photo of a {}.", "a {} toy."]
    with pytest.raises(ValueError, match=r"no entry 'cars'; it has \['toys'\]"):
        load_classnames("clip_benchmark:cars", FOLDERS)
