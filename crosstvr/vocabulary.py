"""Small closed-vocabulary tokenizers for models trained from scratch (tests, the embedded default model).

Real checkpoints use the CLIP BPE tokenizer and BLIP-2's BERT tokenizer from the Hub; these builders make tokenizers
of the same classes over a given word list, so that everything downstream (processor, saving, `AutoProcessor`) is the
code path real checkpoints take. Words outside the list still tokenize, letter by letter.
"""

import string

from transformers import BertTokenizer, CLIPTokenizer


CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CHARACTERS = string.ascii_lowercase + string.digits + ",.'"


def _normalise(words) -> list[str]:
    return sorted({word.lower() for word in words if word})


def build_clip_tokenizer(words) -> CLIPTokenizer:
    """
    A CLIP byte-level BPE tokenizer whose merges spell every word of `words` as one token. Every lowercase letter,
    digit and the punctuation `,.'` are in the vocabulary too, with and without CLIP's end-of-word suffix "</w>" (an
    unknown character would become CLIP's unknown token, which is also its end-of-text token).
    """
    vocab = {token: index for index, token in enumerate(CLIP_SPECIAL_TOKENS)}
    for character in _CHARACTERS:
        vocab.setdefault(character, len(vocab))
        vocab.setdefault(character + "</w>", len(vocab))
    merges = []
    for word in _normalise(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = (merged, piece)
            merged = merged + piece
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_bert_tokenizer(words) -> BertTokenizer:
    """A BERT WordPiece tokenizer (BLIP-2's Q-Former tokenizer class) with every word of `words` as one token."""
    vocab = {token: index for index, token in enumerate(BERT_SPECIAL_TOKENS)}
    for character in _CHARACTERS:
        vocab.setdefault(character, len(vocab))
        vocab.setdefault("##" + character, len(vocab))
    for word in _normalise(words):
        vocab.setdefault(word, len(vocab))
    return BertTokenizer(vocab=vocab)
