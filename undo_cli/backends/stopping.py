"""Where a generation ends once its answer is written: the one rule every backend applies.

    undo evaluate --model M --input problems.jsonl                          # both rules on (the defaults)
    undo evaluate ... --no-stop-at-answer --repetition-cut 0              # as before: eos, stop strings, max tokens
    python -c "from undo_cli.backends.stopping import repetition_start; print(repetition_start('21.' + '\\n####' * 20))"

Real instruct models do not always end their turn. SmolLM2-135M-Instruct writes a right answer
and then `\\n############\\n####...` until the token limit (issue 33: 15 of 20 arithmetic problems ran
to 512 tokens). Beyond the model's own end of turn (its eos ids) and the run's stop strings, two
rules end a completion (docs/method.md, "When a generation stops"):

* **At the answer** (`SamplingConfig.stop_at_answer`, `--stop-at-answer`): every shipped prompt asks
  for a final line `#### <answer>` "and nothing after it", so the completion ends where that line ends
  (`scoring.answer_line_end`: the scorer's own reading of the line, so a markdown heading `#### Step 1`
  does not end it). The line's newline and what follows are not kept; `finish_reason` is `stop`.
* **At a degenerate repetition** (`SamplingConfig.repetition_cut`, `--repetition-cut N`): the text
  ends in one unit of 1-`MAX_PERIOD` characters written `COPIES` or more times back to back, covering at
  least N characters. One copy of the unit is kept (it shows what the model looped on) and the rest is
  cut; `finish_reason` is `repetition`, which counts as truncated wherever `length` does (`CUT_SHORT`).

The hf backend checks both after every token (`RowStop`, over the decoded tail of each sequence still
running), so a sequence stops within a token of meeting a rule and leaves its batch at once
(backends/hf_decode.py). A server (openai) and vLLM generate to their own end; the same rules are applied to the text
they return (`apply`), so the records mean the same whatever the backend, but the tokens after the
cut were spent. Nothing here evaluates text: it is compared, character by character.
"""

from __future__ import annotations

from typing import Any

COPIES = 4          # a unit written this many times in a row is a loop, not emphasis
MAX_PERIOD = 200    # longest unit looked for (a repeated sentence or two)
TAIL_TOKENS = 256   # hf: decoded tokens per check; 4 units of 200 characters are about 250 tokens
CUT_SHORT = ("length", "repetition")  # finish reasons of a completion that did not end by itself


def repetition_start(text: str, min_chars: int, copies: int = COPIES, max_period: int = MAX_PERIOD) -> int | None:
    """Where the text should be cut when it ends in a degenerate repetition, else None.

    The repetition: a unit of p <= max_period characters written at least `copies` times back to back
    at the end of the text, covering at least `min_chars` characters. The index returned keeps one copy
    of the unit (the earliest place the periodic stretch starts, plus p). Smallest period first."""
    n = len(text)
    if min_chars <= 0 or n < min_chars:
        return None
    for p in range(1, min(max_period, n // copies) + 1):
        need = max(copies * p, min_chars)
        if need > n:
            break  # need only grows with p
        if text[n - need + p:] == text[n - need: n - p]:  # the last `need` characters have period p
            i = n - need
            while i > 0 and text[i - 1] == text[i - 1 + p]:
                i -= 1
            return i + p
    return None


def end_of(text: str, sampling: Any, complete: bool) -> tuple[int, str] | None:
    """(where the text ends, finish_reason) by the run's rules, or None when they do not end it.

    complete: the text is still being generated (hf, per token), so an answer line counts only once its
    newline is written. The earlier of the two cuts wins."""
    cuts = []
    if sampling.stop_at_answer:
        from undo_cli.scoring import answer_line_end

        end = answer_line_end(text, complete=complete)
        if end is not None:
            cuts.append((end, "stop"))
    limit = sampling.repetition_cut
    if limit:
        start = repetition_start(text, limit)
        if start is not None:
            cuts.append((start, "repetition"))
    return min(cuts) if cuts else None


def apply(text: str, finish_reason: str | None, sampling: Any) -> tuple[str, str | None, bool]:
    """The rules applied to a finished completion's text: (text, finish_reason, whether it was cut)."""
    cut = end_of(text, sampling, complete=False)
    if cut is None or cut[0] >= len(text):  # nothing after the cut: the completion ended there by itself
        return text, finish_reason, False
    return text[: cut[0]], cut[1], True


def applied_to(completion: Any, sampling: Any) -> Any:
    """A finished Completion with the rules applied (a new one when cut; log-probs are not trimmed: for a
    backend that records none)."""
    import dataclasses

    text, finish, cut = apply(completion.text, completion.finish_reason, sampling)
    return dataclasses.replace(completion, text=text, finish_reason=finish) if cut else completion


def tokens_covering(piece_lengths: list[int], chars: int) -> int:
    """How many of the leading tokens (their decoded lengths, in order) it takes to cover `chars` characters."""
    total = 0
    for k, length in enumerate(piece_lengths):
        if total >= chars:
            return k
        total += length
    return len(piece_lengths)


class RowStop:
    """hf: whether one running sequence has ended by a stop string or by `end_of`, checked after each token.

    Called by the decode loop (backends/hf_decode.py) for the rows still running only, with the row's
    generated ids; decodes its last TAIL_TOKENS tokens (a tokenizer decode, microseconds against a forward
    pass: 0.4 s of 277 s for 32 SmolLM2 rows x 256 steps). A stop string ends the row the step it first
    appears in the text; the backend cuts the text with `apply` (and at the stop string) afterwards."""

    def __init__(self, tokenizer, sampling: Any):
        self.tokenizer, self.sampling = tokenizer, sampling
        self.stops = [s for s in sampling.stop if s]
        self.rules = active(sampling)

    def __call__(self, ids: list[int]) -> bool:
        if not (self.rules or self.stops):
            return False
        text = self.tokenizer.decode(ids[-TAIL_TOKENS:], skip_special_tokens=True)
        if any(s in text for s in self.stops):
            return True
        return self.rules and end_of(text, self.sampling, complete=True) is not None


def active(sampling: Any) -> bool:
    """Whether any of the two rules is on."""
    return bool(sampling.stop_at_answer or sampling.repetition_cut)
