"""Class names and prompt templates for zero-shot classification: from the dataset, a package or a file.

Both loaders take the `classnames` / `templates` value of an `eval` config node:

* ``None``: what the dataset provides (`dataset.classnames` or its folder names; `dataset.templates`);
* a list of strings, used as given;
* ``"imagenet"`` (class names), ``"openai"`` or ``"simple"`` (templates): open_clip's bundled ImageNet
  metadata, the 1000 class names and CLIP's 80 or open_clip's 7 templates;
* ``"clip_benchmark:<key>"``: the `<key>` entry of clip_benchmark's English class-name or template file
  (``pip install 'aclip[benchmark]'``);
* a path to a ``.txt`` file (one entry per line, blank lines ignored) or a ``.json`` file (a list; for
  class names also an object mapping each folder name to its class name).

Class names are matched to labels by position: label i, the i-th class folder in sorted order, gets the
i-th name. Templates are format strings with one ``{}`` for the class name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Formatter
from typing import Any

from open_clip.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)

__all__ = ["Spec", "load_classnames", "load_templates"]

Spec = str | Path | Sequence[str] | None

_CLIP_BENCHMARK = "clip_benchmark:"
_SPEC_FORMS = "a list, 'clip_benchmark:<key>' or a .txt/.json file"


def load_classnames(spec: Spec, dataset: Any) -> list[str]:
    """The class names for the labels of `dataset`, label i getting entry i (see the module docstring).

    Raises:
        ValueError: the number of names differs from the number of classes (`len(dataset.classes)`).
    """
    names = _classnames(spec, dataset)
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(names) != len(classes):
        raise ValueError(
            f"classnames {_describe(spec)} gives {len(names)} names, but the dataset has "
            f"{len(classes)} classes (class folders)"
        )
    return names


def load_templates(spec: Spec, dataset: Any) -> list[str]:
    """The prompt templates for `dataset`, each with one `{}` (see the module docstring).

    Raises:
        ValueError: a template without exactly one `{}` field, or no templates at all.
    """
    templates = _templates(spec, dataset)
    if not templates:
        raise ValueError(f"templates {_describe(spec)} gives no templates")
    for template in templates:
        _check_template(template)
    return templates


def _classnames(spec: Spec, dataset: Any) -> list[str]:
    if spec is None:
        if hasattr(dataset, "classnames"):
            return _strings(dataset.classnames, "the dataset's classnames")
        if hasattr(dataset, "classes"):
            return [folder.replace("_", " ") for folder in dataset.classes]
        raise ValueError(f"the dataset has no class names; set classnames to 'imagenet', {_SPEC_FORMS}")
    if not isinstance(spec, str | Path):
        return _strings(spec, "classnames")
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    if str(spec).startswith(_CLIP_BENCHMARK):
        return _clip_benchmark("en_classnames.json", str(spec))
    entries = _read_file(Path(spec), "classnames", f"null, 'imagenet', {_SPEC_FORMS}")
    if isinstance(entries, dict):
        return _by_folder(entries, dataset, Path(spec))
    return _strings(entries, str(spec))


def _templates(spec: Spec, dataset: Any) -> list[str]:
    if spec is None:
        if hasattr(dataset, "templates"):
            return _strings(dataset.templates, "the dataset's templates")
        raise ValueError(
            f"the dataset has no prompt templates; set templates to 'openai', 'simple', {_SPEC_FORMS}"
        )
    if not isinstance(spec, str | Path):
        return _strings(spec, "templates")
    if spec in ("openai", "simple"):
        # open_clip stores them as functions of the class name; "{}" turns them back into format strings.
        functions = OPENAI_IMAGENET_TEMPLATES if spec == "openai" else SIMPLE_IMAGENET_TEMPLATES
        return [function("{}") for function in functions]
    if str(spec).startswith(_CLIP_BENCHMARK):
        entries = _clip_benchmark("en_zeroshot_classification_templates.json", str(spec))
        return [template.replace("{c}", "{}") for template in entries]
    return _strings(
        _read_file(Path(spec), "templates", f"null, 'openai', 'simple', {_SPEC_FORMS}"), str(spec)
    )


def _clip_benchmark(file: str, spec: str) -> list[str]:
    """The entry `spec` ("clip_benchmark:<key>") of `file` in the clip_benchmark package."""
    key = spec.removeprefix(_CLIP_BENCHMARK)
    try:
        folder = resources.files("clip_benchmark.datasets")
    except ModuleNotFoundError:
        raise ImportError(
            f"{spec!r} needs the clip_benchmark package: pip install 'aclip[benchmark]'"
        ) from None
    table = json.loads(folder.joinpath(file).read_text(encoding="utf-8"))
    if key not in table:
        raise ValueError(f"clip_benchmark's {file} has no entry {key!r}; it has {sorted(table)}")
    return _strings(table[key], f"clip_benchmark's {file}[{key!r}]")


def _read_file(path: Path, what: str, forms: str) -> list[str] | dict[str, str]:
    """The entries of a .txt file (one per line) or the content of a .json file."""
    if path.suffix not in (".txt", ".json"):
        raise ValueError(f"{what} must be {forms}, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _by_folder(names: dict[str, str], dataset: Any, path: Path) -> list[str]:
    """Class names in label order from a mapping of folder name to class name."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ValueError(f"{path} maps folder names to class names, but the dataset has no class folders")
    missing = [folder for folder in classes if folder not in names]
    if missing:
        raise ValueError(f"{path} has no class name for the folders {missing}")
    return _strings([names[folder] for folder in classes], str(path))


def _strings(values: Any, source: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{source} must be a list of strings, got {type(values).__name__}")
    if not all(isinstance(value, str) for value in values):
        raise TypeError(f"{source} must be a list of strings, got {list(values)}")
    return list(values)


def _check_template(template: str) -> None:
    """Raise unless `template` formats with exactly one positional `{}` field."""
    try:
        # (name, format spec, conversion) of each replacement field; "{}" is ("", "", None).
        fields = [parsed[1:] for parsed in Formatter().parse(template) if parsed[1] is not None]
    except ValueError:  # unbalanced braces
        fields = []
    if fields != [("", "", None)]:
        raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")


def _describe(spec: Spec) -> str:
    if spec is None:
        return "from the dataset"
    if isinstance(spec, str | Path):
        return repr(str(spec))
    return "list"
