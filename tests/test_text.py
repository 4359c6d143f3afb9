"""Tests for the offline tokenizer and the EOT-pooled text tower."""

import functools
import socket

import pytest
import torch

from aclip.modules.text import TextTower
from aclip.tokenizer import build_tokenizer

SOT, EOT = 49406, 49407
CONTEXT = 16


@pytest.fixture
def offline(monkeypatch):
    """No network: any socket connection raises, and the Hugging Face hub is told to stay offline."""

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_network_is_really_blocked(offline):
    with pytest.raises(OSError), socket.socket() as sock:
        sock.connect(("127.0.0.1", 9))


def test_tokenizer_offline_layout(offline):
    tokenizer = build_tokenizer(CONTEXT)
    captions = ["a red circle", "a small blue square on a white background", "triangle"]
    tokens = tokenizer(captions)
    assert tokens.dtype == torch.long
    assert tokens.shape == (3, CONTEXT)
    for row, caption in zip(tokens, captions, strict=True):
        bpe = tokenizer.encode(caption)
        assert 0 < len(bpe) <= CONTEXT - 2
        assert all(0 < t < SOT for t in bpe)
        assert row[0].item() == SOT
        assert row[1 : 1 + len(bpe)].tolist() == bpe
        assert row[1 + len(bpe)].item() == EOT
        assert (row[2 + len(bpe) :] == 0).all()
        assert (row == EOT).sum().item() == 1


def test_tokenizer_single_string_and_decoding(offline):
    tokenizer = build_tokenizer(CONTEXT)
    tokens = tokenizer("a red circle")
    assert tokens.shape == (1, CONTEXT)
    # "a", "red", "circle" are single BPE tokens in CLIP's vocabulary.
    assert tokens[0, :5].tolist()[0] == SOT and tokens[0, 4].item() == EOT
    assert tokenizer.decode(tokens[0, 1:4].tolist()).strip() == "a red circle"


def test_tokenizer_truncates_long_captions_keeping_eot_last(offline):
    context = 8
    tokenizer = build_tokenizer(context)
    caption = " ".join(["circle"] * 20)
    bpe = tokenizer.encode(caption)
    assert len(bpe) > context
    tokens = tokenizer([caption])[0]
    assert tokens.shape == (context,)
    assert tokens[0].item() == SOT
    assert tokens[1:-1].tolist() == bpe[: context - 2]
    assert tokens[-1].item() == EOT


def test_tokenizer_default_context_is_77(offline):
    assert build_tokenizer()(["a red circle"]).shape == (1, 77)


def test_tokenizer_minimal_context(offline):
    tokenizer = build_tokenizer(3)
    assert tokenizer(["a red circle"]).tolist() == [[SOT, tokenizer.encode("a")[0], EOT]]


@pytest.mark.parametrize("context_length", [0, 1, 2])
def test_tokenizer_rejects_tiny_context(context_length):
    with pytest.raises(ValueError, match="context_length"):
        build_tokenizer(context_length)


# --------------------------------------------------------------------------------------------------
# TextTower
# --------------------------------------------------------------------------------------------------


def make_tower():
    torch.manual_seed(0)
    return TextTower(context_length=CONTEXT, width=32, heads=2, layers=2, output_dim=24).eval()


@functools.lru_cache(maxsize=1)
def shared_tokenizer():
    return build_tokenizer(CONTEXT)


def tokens_for(captions):
    return shared_tokenizer()(captions)


def test_text_tower_output_shape():
    tower = make_tower()
    with torch.no_grad():
        out = tower(tokens_for(["a red circle", "a blue square", "green"]))
    assert out.shape == (3, 24)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_text_tower_pools_at_eot():
    """Tokens after EOT (padding) are invisible; a token before EOT changes the output."""
    tower = make_tower()
    tokens = tokens_for(["a red circle", "a blue square"])
    eot = (tokens == EOT).int().argmax(dim=1)
    assert eot.tolist() == [4, 4]
    with torch.no_grad():
        base = tower(tokens)
        after = tokens.clone()
        after[:, 6:] = torch.randint(1, SOT, (2, CONTEXT - 6), generator=torch.Generator().manual_seed(0))
        after[:, 5] = SOT  # even a special token after EOT must not matter
        torch.testing.assert_close(tower(after), base)
        before = tokens.clone()
        before[:, 2] = tokens_for(["green"])[0, 1]  # "red"/"blue" -> "green"
        changed = tower(before)
        assert not torch.allclose(changed[0], base[0], atol=1e-5)
        assert not torch.allclose(changed[1], base[1], atol=1e-5)


def test_text_tower_output_is_the_eot_state():
    """Moving the EOT changes the pooled position: pooling is at EOT, not at a fixed index."""
    tower = make_tower()
    long = tokens_for(["a red circle on white"])
    short = long.clone()
    short[0, 4] = EOT
    short[0, 5:] = 0
    with torch.no_grad():
        assert not torch.allclose(tower(long), tower(short), atol=1e-5)
        # A prefix with its EOT at the same place gives the same embedding as the short caption.
        torch.testing.assert_close(tower(short), tower(tokens_for(["a red circle"])))


def test_text_tower_rejects_too_long_tokens():
    tower = make_tower()
    with pytest.raises(ValueError, match=str(CONTEXT)):
        tower(build_tokenizer(CONTEXT + 4)(["a red circle"]))
    with pytest.raises(ValueError, match=str(CONTEXT)):
        tower(torch.zeros(2, 2 * CONTEXT, dtype=torch.long))


def test_text_tower_shorter_tokens_equal_padded():
    """Captions shorter than the context (CLIPA text reduction) run at their own length, and give
    the embedding of the zero-padded tokens: causal attention and EOT pooling make padding invisible."""
    tower = make_tower()
    padded = tokens_for(["a red circle", "a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(tower(padded[:, : CONTEXT - 4]), tower(padded))


def test_text_tower_rejects_tokens_longer_than_context():
    tower = make_tower()
    with pytest.raises(ValueError, match=str(CONTEXT)):
        tower(torch.zeros(1, CONTEXT + 1, dtype=torch.long))


def test_text_tower_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        TextTower(context_length=CONTEXT, width=30, heads=4, layers=1, output_dim=8)


def test_text_tower_gradients_reach_embeddings():
    tower = make_tower().train()
    tower(tokens_for(["a red circle"])).sum().backward()
    grads = [p.grad for p in tower.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
