"""CLIPA text token reduction: `build_tokenizer(context_length, reduction)` and conf/text_masking."""

from __future__ import annotations

import functools
import pickle
import random
import sys
import types

import open_clip.tokenizer
import pytest
import torch
from hydra.utils import instantiate

from aclip.tokenizer import build_tokenizer
from tests.helpers import CONF_DIR

SOT, EOT = 49406, 49407
CONTEXT = 8  # start, 6 caption tokens, end
WORDS = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
SHORT = "a red circle on grey"
TEXT_MASKINGS = sorted(p.stem for p in (CONF_DIR / "text_masking").glob("*.yaml"))


@pytest.fixture(scope="module")
def bpe():
    """The caption's BPE tokens without reduction: 16 distinct tokens, more than fit in CONTEXT."""
    tokens = build_tokenizer(77).encode(WORDS)
    assert len(tokens) == 16 and len(set(tokens)) == 16
    return tokens


@functools.lru_cache
def cached_tokenizer(context, reduction):
    return build_tokenizer(context, reduction)


def reduce(reduction, caption=WORDS, seed=0, context=CONTEXT):
    torch.manual_seed(seed)
    random.seed(seed)
    return cached_tokenizer(context, reduction)([caption])[0].tolist()


def assert_layout(row):
    assert len(row) == CONTEXT
    assert row[0] == SOT and row[-1] == EOT  # long caption: the whole context is used
    assert EOT not in row[1:-1] and 0 not in row


def is_subsequence(part, whole):
    iterator = iter(whole)
    return all(token in iterator for token in part)


def test_truncate_keeps_the_first_tokens(bpe):
    row = reduce("truncate")
    assert_layout(row)
    assert row[1:-1] == bpe[: CONTEXT - 2]
    assert reduce("truncate", seed=1) == row  # deterministic


def test_default_reduction_is_truncate(bpe):
    assert build_tokenizer(CONTEXT)([WORDS])[0].tolist() == reduce("truncate")


def test_random_keeps_an_ordered_subset_varying_with_the_seed(bpe):
    rows = [reduce("random", seed=seed) for seed in range(8)]
    for row in rows:
        assert_layout(row)
        kept = row[1:-1]
        assert len(set(kept)) == CONTEXT - 2
        assert is_subsequence(kept, bpe)  # a subset of the caption's tokens, in their original order
    assert len({tuple(row) for row in rows}) > 1  # not a fixed choice
    assert any(row[1:-1] != bpe[: CONTEXT - 2] for row in rows)  # not truncation
    assert reduce("random", seed=3) == rows[3]  # reproducible under the seed
    # Not always a contiguous window either.
    windows = {tuple(bpe[s : s + CONTEXT - 2]) for s in range(len(bpe) - CONTEXT + 3)}
    assert any(tuple(row[1:-1]) not in windows for row in rows)


def test_block_keeps_a_contiguous_window_varying_with_the_seed(bpe):
    rows = [reduce("block", seed=seed) for seed in range(8)]
    starts = set()
    for row in rows:
        assert_layout(row)
        kept = row[1:-1]
        start = bpe.index(kept[0])
        assert kept == bpe[start : start + CONTEXT - 2]
        starts.add(start)
    assert len(starts) > 1 and starts != {0}
    assert reduce("block", seed=5) == rows[5]


@pytest.mark.parametrize("reduction", ["truncate", "random", "block"])
def test_short_captions_are_identical_under_every_reduction(reduction):
    tokenizer = build_tokenizer(CONTEXT)
    expected = tokenizer([SHORT, "green"])
    for seed in range(3):
        torch.manual_seed(seed)
        random.seed(seed)
        assert torch.equal(build_tokenizer(CONTEXT, reduction)([SHORT, "green"]), expected)
    # Exactly as long as the context: nothing to drop either.
    exact = "one two three four five six"
    torch.manual_seed(0)
    random.seed(0)
    assert torch.equal(build_tokenizer(CONTEXT, reduction)([exact]), tokenizer([exact]))


@pytest.mark.parametrize("reduction", ["truncate", "random", "block"])
def test_reductions_return_long_tensor_of_context_length(reduction):
    tokens = build_tokenizer(CONTEXT, reduction)([WORDS, SHORT, "red"])
    assert tokens.dtype == torch.long and tokens.shape == (3, CONTEXT)


@pytest.mark.parametrize("reduction", ["shuffle", "simple", "", "Truncate", "syntactic"])
def test_unknown_reduction_lists_the_choices(reduction):
    with pytest.raises(ValueError, match=r"block.*random.*syntax.*truncate"):
        build_tokenizer(CONTEXT, reduction)


# --------------------------------------------------------------------------------------------------
# syntax (NLTK): a clear error offline, never a download
# --------------------------------------------------------------------------------------------------


# Part-of-speech tags of the fake tagger below; every other word is a determiner ("DT").
TAGS = {"dog": "NN", "cat": "NN", "house": "NN", "red": "JJ", "big": "JJ", "small": "JJ", "runs": "VBZ"}


class FakeNLTK(types.ModuleType):
    """A stand-in `nltk`: `data.find` fails for `missing` resources; `download` records its calls."""

    def __init__(self, missing=()):
        super().__init__("nltk")
        self.downloads = []
        self.found = []

        def find(resource):
            if resource in missing:
                raise LookupError(f"Resource {resource} not found.")
            self.found.append(resource)
            return f"/fake/{resource}"

        self.data = types.SimpleNamespace(find=find, path=[])
        self.tokenize = types.SimpleNamespace(word_tokenize=str.split)

    def download(self, *args, **kwargs):
        self.downloads.append((args, kwargs))
        return True

    def pos_tag(self, tokens):
        return [(token, TAGS.get(token, "DT")) for token in tokens]


@pytest.fixture
def fake_nltk(monkeypatch):
    def install(missing=()):
        module = FakeNLTK(missing)
        monkeypatch.setitem(sys.modules, "nltk", module)
        return module

    monkeypatch.setattr(open_clip.tokenizer, "_nltk_init", False)
    return install


def test_syntax_without_nltk_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # `import nltk` fails, installed or not
    with pytest.raises(ImportError, match=r"\.\[syntax\]"):
        build_tokenizer(CONTEXT, "syntax")


@pytest.mark.parametrize("missing", ["tokenizers/punkt_tab", "taggers/averaged_perceptron_tagger_eng"])
def test_syntax_with_missing_nltk_data_raises_without_downloading(fake_nltk, missing):
    nltk = fake_nltk(missing=(missing,))
    with pytest.raises(RuntimeError, match=r"nltk\.downloader") as error:
        build_tokenizer(CONTEXT, "syntax")
    assert missing in str(error.value)
    assert "punkt_tab" in str(error.value) and "averaged_perceptron_tagger_eng" in str(error.value)
    assert nltk.downloads == []
    assert open_clip.tokenizer._nltk_init is False


def test_syntax_with_nltk_data_keeps_nouns_then_adjectives_and_never_downloads(fake_nltk):
    nltk = fake_nltk()
    tokenizer = build_tokenizer(CONTEXT, "syntax")
    assert sorted(nltk.found) == ["taggers/averaged_perceptron_tagger_eng", "tokenizers/punkt_tab"]
    # 3 nouns + 3 adjectives fill the 6 slots; articles, conjunctions, prepositions and the verb go.
    row = tokenizer(["the red dog and the big cat runs near a small house"])[0].tolist()
    assert nltk.downloads == []
    expected = [SOT, *tokenizer.encode("red dog big cat small house"), EOT]
    assert row == expected
    # Verbs come before the rest once nouns and adjectives are in.
    row = build_tokenizer(6, "syntax")(["the dog runs to a red house"])[0].tolist()
    assert row == [SOT, *tokenizer.encode("dog runs red house"), EOT]
    assert nltk.downloads == []


def test_syntax_tokenizer_in_a_fresh_worker_process_never_downloads(fake_nltk, monkeypatch):
    nltk = fake_nltk()
    payload = pickle.dumps(build_tokenizer(CONTEXT, "syntax"))
    # What a spawned worker sees: a freshly imported open_clip.tokenizer, then the unpickled tokenizer.
    monkeypatch.setattr(open_clip.tokenizer, "_nltk_init", False)
    tokenizer = pickle.loads(payload)
    row = tokenizer(["the red dog and the big cat runs near a small house"])[0].tolist()
    assert row[0] == SOT and EOT in row
    assert nltk.downloads == []


# --------------------------------------------------------------------------------------------------
# conf/text_masking
# --------------------------------------------------------------------------------------------------


def test_text_masking_group_has_every_reduction():
    assert TEXT_MASKINGS == ["block", "random", "syntax", "truncate"]


@pytest.mark.parametrize("name", TEXT_MASKINGS)
def test_text_masking_config_composes(train_config, name):
    cfg = train_config(f"text_masking={name}")
    assert instantiate(cfg.text_masking).reduction == name
    assert instantiate(cfg.data.text_masking).reduction == name
    # The default length follows the text tower's context length (16 in the tiny test config).
    assert cfg.text_masking.length == cfg.model.text.context_length == 16
    assert cfg.data.text_masking.length == 16


@pytest.mark.parametrize("name", ["truncate", "random", "block"])
def test_text_masking_config_reaches_the_datamodule_tokenizer(train_config, name):
    datamodule = instantiate(train_config(f"text_masking={name}", "text_masking.length=8").data)
    for seed in range(3):
        torch.manual_seed(seed)
        random.seed(seed)
        got = datamodule.tokenizer([WORDS])
        assert got[0].tolist() == reduce(name, seed=seed)


def test_random_text_masking_length_sets_the_batch_text_width(train_config):
    cfg = train_config("text_masking=random", "text_masking.length=8")
    datamodule = instantiate(cfg.data)
    batch = next(iter(datamodule.train_dataloader()))
    text = batch["text"]
    assert text.dtype == torch.long
    assert text.shape == (cfg.data.batch_size, 8)
    assert (text[:, 0] == SOT).all()
    assert ((text == EOT).sum(dim=1) == 1).all()
    # The evaluation keeps the tower's full context length.
    assert cfg.model.text.context_length == 16
