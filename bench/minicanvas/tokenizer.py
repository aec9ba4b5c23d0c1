"""The MiniCanvas tokenizer: a CLIP-format BPE learned from the world's own captions.

Trained with the `tokenizers` library using CLIP's conventions (byte-to-unicode alphabet,
`</w>` end-of-word suffix), then written as the vocab/merges a stock `CLIPTokenizer` reads,
so `StableDiffusionPipeline.from_pretrained` needs nothing custom. Words of the world become
single tokens; anything else falls back to characters.
"""

from __future__ import annotations

from bench.minicanvas.world import all_caption_words

MAX_LENGTH = 32  # captions are short; a 77-token context would only cost attention time


def _byte_alphabet() -> list[str]:
    from bench.tiny_pipelines import _bytes_to_unicode

    return _bytes_to_unicode()


def build_tokenizer(extra_merges: int = 400):
    """A CLIPTokenizer whose vocabulary covers every word of the world."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + extra_merges,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(all_caption_words(), trainer)
    learned = bpe.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(bpe)]

    # CLIP's layout: the byte alphabet, the alphabet with </w>, merges in rank order, specials.
    tokens = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    for a, b in merges:
        merged = a + b
        if merged not in seen:
            tokens.append(merged)
            seen.add(merged)
    missing = [t for t in learned if t not in seen and len(t) > 1]
    if missing:
        raise RuntimeError(f"tokenizer export lost tokens: {missing[:5]}")
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def _merges(bpe) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]
