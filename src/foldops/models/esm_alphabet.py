"""ESM-2's 33-token alphabet and a batch converter with fair-esm's interface (no network).

Token order (fair-esm's ``Alphabet.from_architecture("ESM-1b")``, used by every ESM-2
model and by Hugging Face's ``EsmTokenizer`` vocabularies):

    0 <cls>  1 <pad>  2 <eos>  3 <unk>
    4..30    L A G V S E R T I D P K Q N F Y M H W C X B U Z O . -
    31 <null_1>  32 <mask>

Tokenizing (as fair-esm): special tokens written in the text (``<mask>``, ``<unk>``,
``<cls>``, ...) are kept whole, whitespace is dropped, every other character is one
residue token. ``X`` (any residue), ``B``, ``U``, ``Z``, ``O``, ``.`` and ``-`` are tokens
of the alphabet. A character outside it raises ``ValueError`` naming it and its
position (fair-esm raises a bare ``KeyError``); ``unknown="unk"`` maps it to ``<unk>``
instead, as Hugging Face's tokenizer does.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple, Union

import torch

PREPEND_TOKS = ("<cls>", "<pad>", "<eos>", "<unk>")
RESIDUE_TOKS = ("L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M",
                "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-")
APPEND_TOKS = ("<mask>",)


class Alphabet:
    """ESM-2's vocabulary: ``tok_to_idx``, ``all_toks`` and the special indices as fair-esm names them."""

    def __init__(self) -> None:
        toks = list(PREPEND_TOKS) + list(RESIDUE_TOKS)
        # fair-esm pads the vocabulary to a multiple of 8 before the appended tokens.
        toks += [f"<null_{i + 1}>" for i in range((8 - len(toks) % 8) % 8)]
        toks += list(APPEND_TOKS)
        self.all_toks: List[str] = toks
        self.tok_to_idx = {t: i for i, t in enumerate(toks)}
        self.prepend_bos = True
        self.append_eos = True
        self.use_msa = False
        self.padding_idx = self.tok_to_idx["<pad>"]
        self.cls_idx = self.tok_to_idx["<cls>"]
        self.eos_idx = self.tok_to_idx["<eos>"]
        self.unk_idx = self.tok_to_idx["<unk>"]
        self.mask_idx = self.tok_to_idx["<mask>"]
        specials = sorted((t for t in toks if len(t) > 1), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def __len__(self) -> int:
        return len(self.all_toks)

    def get_idx(self, tok: str) -> int:
        return self.tok_to_idx.get(tok, self.unk_idx)

    def get_tok(self, ind: int) -> str:
        return self.all_toks[ind]

    def tokenize(self, text: str, unknown: str = "error") -> List[str]:
        """Split ``text`` into tokens (see the module doc)."""
        if not isinstance(text, str):
            raise TypeError(f"sequence: expected a str, got {type(text).__name__}")
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown: expected 'error' or 'unk', got {unknown!r}")
        out: List[str] = []
        pos = 0
        for piece in self._split.split(text):
            if piece in self.tok_to_idx and len(piece) > 1:
                out.append(piece)
            else:
                for offset, ch in enumerate(piece):
                    if ch.isspace():
                        continue
                    if ch not in self.tok_to_idx:
                        if unknown == "unk":
                            out.append("<unk>")
                            continue
                        raise ValueError(
                            f"sequence: character {ch!r} at position {pos + offset} is not in ESM-2's "
                            f"alphabet ({''.join(RESIDUE_TOKS)} and <...> special tokens); use 'X' for an "
                            f"unknown residue or unknown='unk' to map it to <unk>")
                    out.append(ch)
            pos += len(piece)
        return out

    def encode(self, text: str, unknown: str = "error") -> List[int]:
        return [self.tok_to_idx[t] for t in self.tokenize(text, unknown)]

    def decode(self, ids: Union[Sequence[int], torch.Tensor], strip_special: bool = True) -> str:
        """Token ids back to a string; ``strip_special`` drops <cls>, <eos> and <pad>."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = {self.cls_idx, self.eos_idx, self.padding_idx} if strip_special else set()
        return "".join(self.all_toks[i] for i in ids if i not in skip)

    def get_batch_converter(self, truncation_seq_length: Optional[int] = None, unknown: str = "error"):
        return BatchConverter(self, truncation_seq_length, unknown)


class BatchConverter:
    """fair-esm's batch converter: ``(labels, strs, tokens)`` from (label, sequence) pairs or strings.

    ``tokens`` is int64 ``[B, T]`` with T = longest encoded sequence + 2: ``<cls>``, the
    residues, ``<eos>``, then ``<pad>`` to the right. ``truncation_seq_length`` cuts each
    encoded sequence before BOS/EOS are added, as fair-esm. Empty sequences raise
    ``ValueError`` (they have no residue to embed).
    """

    def __init__(self, alphabet: Alphabet, truncation_seq_length: Optional[int] = None,
                 unknown: str = "error") -> None:
        if truncation_seq_length is not None and (not isinstance(truncation_seq_length, int)
                                                  or truncation_seq_length < 1):
            raise ValueError(f"truncation_seq_length: expected a positive int or None, got {truncation_seq_length!r}")
        self.alphabet = alphabet
        self.truncation_seq_length = truncation_seq_length
        self.unknown = unknown

    def __call__(self, raw_batch) -> Tuple[List[Optional[str]], List[str], torch.Tensor]:
        if isinstance(raw_batch, str):
            raw_batch = [raw_batch]
        raw_batch = list(raw_batch)
        if not raw_batch:
            raise ValueError("raw_batch: expected at least one sequence, got an empty batch")
        labels: List[Optional[str]] = []
        strs: List[str] = []
        for i, item in enumerate(raw_batch):
            if isinstance(item, str):
                label, seq = None, item
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                label, seq = item
            else:
                raise TypeError(f"raw_batch[{i}]: expected a (label, sequence) pair or a str, got {item!r}")
            labels.append(label)
            strs.append(seq)
        encoded = []
        for i, seq in enumerate(strs):
            try:
                ids = self.alphabet.encode(seq, self.unknown)
            except ValueError as exc:
                raise ValueError(f"raw_batch[{i}] ({labels[i]!r}): {exc}") from None
            if not ids:
                raise ValueError(f"raw_batch[{i}] ({labels[i]!r}): empty sequence (no residue tokens)")
            if self.truncation_seq_length is not None:
                ids = ids[: self.truncation_seq_length]
            encoded.append(ids)
        width = max(len(e) for e in encoded) + 2
        tokens = torch.full((len(encoded), width), self.alphabet.padding_idx, dtype=torch.int64)
        for i, ids in enumerate(encoded):
            tokens[i, 0] = self.alphabet.cls_idx
            tokens[i, 1: len(ids) + 1] = torch.tensor(ids, dtype=torch.int64)
            tokens[i, len(ids) + 1] = self.alphabet.eos_idx
        return labels, strs, tokens
