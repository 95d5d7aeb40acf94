"""Tokens as bytes: comparing two tokenizers, and aligning their tokenisations of one text.

    from undo_cli.tokenization import TokenBytes, align_spans, tokenizer_difference
    student, teacher = TokenBytes.of(student_tokenizer), TokenBytes.of(teacher_tokenizer)
    spans = align_spans(student.pieces(student_ids), teacher.pieces(teacher_ids))
    # [(a, b, c, d), ...]: student tokens a..b-1 and teacher tokens c..d-1 spell the same bytes

A teacher with another tokenizer splits the same text into other tokens. To compare
its next-token distributions with the student's (objectives/cross_tokenizer.py), we
need the places where both have read exactly the same text. Those are found on the
**UTF-8 byte** axis, never on characters: a byte-level BPE token can be part of a
character (an emoji is 4 bytes, often 2-4 tokens), and character offsets then give
two tokens the same span (TRL's GOLD trainer moved from character to byte offsets
for this, after alignments broke on a BOS token and non-ASCII text). Every token
id stands for a definite byte string (`TokenBytes`): its vocabulary string mapped
back through the byte-level alphabet (GPT-2, Llama 3, Qwen, Mistral v0.3, ...),
or with `▁` as a space and `<0xNN>` as a byte (SentencePiece: Llama 2, Gemma), or,
for special tokens, their text. A sequence's byte offsets are the running sums of
its tokens' lengths, and they are checked against the text they must spell
(`cover`): anything that does not add up is left out rather than guessed.

`align_spans` then walks both byte sequences: a span closes where both
tokenisations have a token boundary at the same byte (GOLD's rule). Most spans
are one token on each side; where the tokenizers split differently a span holds
several tokens on one side or both. Only the common byte prefix of the two texts
is aligned: the chat templates' end-of-turn markers differ after it.

Also here, because they are the same question asked of the vocabulary: the
shared vocabulary (token ids whose bytes are identical in both tokenizers,
special tokens excepted) and `tokenizer_difference` (are two tokenizers the same,
token by token).

Only the standard library: tokenizers are passed in.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Sequence

Span = tuple[int, int, int, int]  # student tokens [a, b), teacher tokens [c, d)


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the other 68 bytes for
    the characters 256, 257, ... in byte order. Inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _scheme(tokenizer) -> str:
    """How vocabulary strings spell bytes: 'byte-level', 'sentencepiece' or 'decode' (ask the tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "decode"
    spec = json.loads(backend.to_str())
    parts = [spec.get("decoder") or {}, spec.get("pre_tokenizer") or {}]
    text = json.dumps(parts, ensure_ascii=False)
    if '"ByteLevel"' in text:
        return "byte-level"
    if '"Metaspace"' in text or '"ByteFallback"' in text or "\u2581" in text:
        return "sentencepiece"
    return "decode"


def _sentencepiece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


class TokenBytes:
    """The byte string each token id of a tokenizer stands for (see the module docstring).

    `table[i]` is bytes; `special` the ids of special tokens (their bytes are their text, e.g.
    b"<|im_end|>", which is how a chat template writes them).
    """

    def __init__(self, tokenizer):
        self.scheme = _scheme(tokenizer)
        size = len(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        decoder = _byte_level_decoder()
        added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self.special: frozenset[int] = frozenset(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                                                 if t.special) | frozenset(tokenizer.all_special_ids)
        table: list[bytes] = []
        for i, token in enumerate(tokens):
            if i in added or token is None:
                table.append((added.get(i) or "").encode("utf-8"))
            elif self.scheme == "byte-level" and all(c in decoder for c in token):
                table.append(bytes(decoder[c] for c in token))
            elif self.scheme == "sentencepiece":
                table.append(_sentencepiece_bytes(token))
            else:
                table.append(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
        self.table = table

    @classmethod
    def of(cls, tokenizer) -> "TokenBytes":
        """Built once per tokenizer object (a 150k vocabulary takes ~0.3 s)."""
        cached = getattr(tokenizer, "_undo_token_bytes", None)
        if cached is None:
            cached = cls(tokenizer)
            try:
                tokenizer._undo_token_bytes = cached
            except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes
                pass
        return cached

    def pieces(self, ids: Sequence[int]) -> list[bytes]:
        return [self.table[i] if 0 <= i < len(self.table) else b"" for i in ids]


def cover(pieces: list[bytes], text: bytes) -> list[bytes] | None:
    """`pieces` adjusted to spell `text` from its first byte, or None when they do not.

    The pieces may stop before the end of the text (a truncated example) or run past it (an
    end-of-turn marker, a stop string the text was cut at); where both exist they must match byte
    for byte. A SentencePiece tokenizer adds a space before the first word that the text does not
    have ("▁Hello" for "Hello"): that one byte is dropped.
    """
    joined = b"".join(pieces)
    if pieces and joined[:1] == b" " and text[:1] != b" ":
        n = min(len(joined) - 1, len(text))
        if joined[1:1 + n] == text[:n]:
            return [pieces[0][1:], *pieces[1:]]
    n = min(len(joined), len(text))
    return pieces if joined[:n] == text[:n] else None


def byte_offsets(pieces: list[bytes], length: int | None = None) -> list[list[int]]:
    """[[start, end], ...] of each piece on the byte axis, clipped to `length` (bytes past it: zero width)."""
    out, at = [], 0
    for piece in pieces:
        start, at = at, at + len(piece)
        if length is not None:
            start, end = min(start, length), min(at, length)
        else:
            end = at
        out.append([start, end])
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def align_spans(student: list[bytes], teacher: list[bytes], limit: int | None = None) -> list[Span]:
    """Spans of tokens that spell the same bytes: [(a, b, c, d)], student tokens a..b-1, teacher c..d-1.

    Both token lists spell texts that agree on their first `limit` bytes (default: their common
    prefix); only that part is aligned. A span closes at every byte where both have a token boundary.
    Spans start and end with tokens that have bytes: zero-width tokens before the first span, between
    spans or after the last (a BOS, an end-of-sequence token recorded past the text) belong to none.
    """
    if limit is None:
        limit = _common_prefix(b"".join(student), b"".join(teacher))

    def boundaries(pieces: list[bytes]) -> dict[int, int]:
        out, end = {}, 0
        for i, piece in enumerate(pieces):
            end += len(piece)
            if end > limit:
                break
            if piece:
                out[end] = i
        return out

    def opener(pieces: list[bytes], i: int) -> int:
        while i < len(pieces) and not pieces[i]:
            i += 1
        return i

    bs, bt = boundaries(student), boundaries(teacher)
    spans: list[Span] = []
    a, c = opener(student, 0), opener(teacher, 0)
    for at in sorted(set(bs) & set(bt)):
        b, d = bs[at] + 1, bt[at] + 1
        spans.append((a, b, c, d))
        a, c = opener(student, b), opener(teacher, d)
    return spans


def shared_vocabulary(student: TokenBytes, teacher: TokenBytes) -> tuple[list[int], list[int]]:
    """(student ids, teacher ids) of the tokens both vocabularies have, matched by their bytes, specials excepted.

    One-to-one: where a vocabulary has several ids for one byte string (rare: added tokens), the lowest counts.
    """
    mine: dict[bytes, int] = {}
    for i, piece in enumerate(student.table):
        if piece and i not in student.special:
            mine.setdefault(piece, i)
    s_ids, t_ids, seen = [], [], set()
    for j, piece in enumerate(teacher.table):
        i = mine.get(piece)
        if i is not None and j not in teacher.special and i not in seen:
            seen.add(i)
            s_ids.append(i)
            t_ids.append(j)
    return s_ids, t_ids


def tokenizer_difference(teacher, student) -> str | None:
    """None if the two tokenizers have the same tokens (string -> id) and special tokens, else the first difference.

    Token by token, not by size: two tokenizers trained on different text can have exactly as many
    tokens, and then every id means something else.
    """
    theirs, mine = teacher.get_vocab(), student.get_vocab()
    if len(theirs) != len(mine):
        return f"{len(theirs)} vs {len(mine)} tokens"
    for token, i in mine.items():
        if theirs.get(token) != i:
            return (f"as many tokens ({len(mine)}), but {token!r} is id {i} for the student and "
                    f"{theirs.get(token)} for the teacher")

    def specials(tok) -> dict[int, str]:
        return {i: t.content for i, t in tok.added_tokens_decoder.items() if t.special}

    if specials(teacher) != specials(student):
        diff = sorted(set(specials(teacher).items()) ^ set(specials(student).items()))
        return f"the same tokens, but other special tokens: {diff[:4]}"
    return None


@dataclass
class Comparison:
    """How two tokenizers relate (`compare`), for `undo check` and `--objective auto`."""

    relation: str                 # "identical" | "same vocabulary size, different" | "different"
    difference: str | None        # the first difference, in words (None when identical)
    teacher_size: int
    student_size: int
    shared: int                   # tokens both have (same bytes), specials excepted
    texts: int = 0                # data texts tokenised by both
    texts_same_ids: int = 0       # ... into the same ids
    special_differences: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compare(teacher, student, texts: Sequence[str] = ()) -> Comparison:
    """Identical / same vocabulary size but different / different, token by token and on `texts`."""
    why = tokenizer_difference(teacher, student)
    t_size, s_size = len(teacher), len(student)
    relation = "identical" if why is None else (
        "same vocabulary size, different" if t_size == s_size else "different")
    s_ids, _ = shared_vocabulary(TokenBytes.of(student), TokenBytes.of(teacher))
    same = sum(teacher(t, add_special_tokens=False)["input_ids"] == student(t, add_special_tokens=False)["input_ids"]
               for t in texts)

    def specials(tok) -> dict[str, str]:
        return {name: str(getattr(tok, name, None)) for name in ("bos_token", "eos_token", "pad_token")}

    t_spec, s_spec = specials(teacher), specials(student)
    special_diff = [f"{k}: teacher {t_spec[k]!r}, student {s_spec[k]!r}" for k in t_spec if t_spec[k] != s_spec[k]]
    return Comparison(relation, why, t_size, s_size, len(s_ids), len(texts), same, special_diff)
