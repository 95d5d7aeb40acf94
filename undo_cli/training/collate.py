"""Turning encoded examples into batches, without wasting compute on padding.

An example is `{"input_ids": [...], "labels": [...]}` as `prompts.encode_example`
builds it (prompt positions labelled -100). Two ways to batch them; which one
wastes less depends on the attention kernel (`stages/train.py` picks; `--padding-free`):

* **Packed** (`PackedCollator`). The examples of a micro-batch are laid end to
  end in ONE row, `[1, total_tokens]`, with `position_ids` that restart at 0 for
  every example and no `attention_mask`. transformers then sees packed
  sequences: `masking_utils.find_packed_sequence_indices` turns the position
  resets into a block-diagonal causal mask for sdpa/eager (checked in
  tests/test_train.py: the packed loss equals the sum of per-example losses),
  and FlashAttention gets `cu_seq_lens_*` and runs each example separately
  (varlen). Nothing is padded. The first label of every example is -100, so no
  token learns to predict across a boundary. The flattening itself is
  transformers' `DataCollatorWithFlattening`.
  The catch: sdpa and eager have no varlen path, so they compute attention over
  the whole row under a dense mask, (sum of lengths)^2 instead of the sum of
  squares: for a batch of 8 that is ~8x the attention work. Packing pays off
  with a varlen kernel (flash_attention_2/3).

* **Padded** (`PaddedCollator` + `LengthGroupedSampler`). Right-padded to the
  longest example of the micro-batch, with batches drawn from length-sorted
  mega-batches so neighbours have similar lengths: a few percent of padding
  and no quadratic waste (bench/train.py: 5% padding vs 30% for random batches).

Both keep `labels` (and the packed `position_ids`) in the batch, so a white-box
loss can be plugged into `UndoTrainer` without touching them. Any other
per-token list field of an example (same length as `input_ids`, e.g. offline
teacher log-probabilities) travels along: concatenated like `labels` when
packing, right-padded with `extra_pad_value` otherwise.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
_CORE_KEYS = ("input_ids", "labels")


def _token_extras(features: list[dict[str, Any]]) -> list[str]:
    """Keys of per-token fields beyond input_ids/labels (lists as long as input_ids)."""
    first = features[0]
    return [k for k, v in first.items()
            if k not in _CORE_KEYS and isinstance(v, (list, tuple)) and len(v) == len(first["input_ids"])]


class PackedCollator:
    """Flatten a micro-batch into one row with restarting position_ids (no padding at all)."""

    def __init__(self, *, flash_attention: bool = False):
        from transformers import DataCollatorWithFlattening

        # FlashAttention reads sequence boundaries from cu_seq_lens; sdpa/eager from position_ids.
        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                   return_flash_attn_kwargs=flash_attention)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        extras = _token_extras(features)
        batch = self._flatten([{k: f[k] for k in _CORE_KEYS} for f in features])
        for key in extras:
            flat = [x for f in features for x in f[key]]
            batch[key] = torch.tensor(flat).unsqueeze(0)
        return batch


class PaddedCollator:
    """Right-pad a micro-batch to its longest example (labels with -100, an attention_mask)."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, extra_pad_value: float = 0):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.extra_pad_value = extra_pad_value

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = len(features)
        batch = {
            "input_ids": torch.full((rows, width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((rows, width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((rows, width), dtype=torch.long),
        }
        for key in _token_extras(features):
            sample = torch.tensor(features[0][key])
            batch[key] = torch.full((rows, width, *sample.shape[1:]), self.extra_pad_value, dtype=sample.dtype)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
            batch["labels"][i, :n] = torch.tensor(f["labels"])
            batch["attention_mask"][i, :n] = 1
            for key in batch.keys() - {"input_ids", "labels", "attention_mask"}:
                batch[key][i, :n] = torch.tensor(f[key])
        return batch


class LengthGroupedSampler:
    """transformers' length grouping (shuffle, sort by length within mega-batches), seeded per epoch.

    transformers' own LengthGroupedSampler draws from the global RNG when an epoch
    starts, so a run resumed in a later epoch would see a different order than an
    uninterrupted one. Here the order is a function of (seed, epoch) only; the
    Trainer calls `set_epoch`.

    Mega-batches hold at least 8 batches: transformers' default (50 batches, or a
    quarter of the data when smaller) falls to *one* batch for a dataset of fewer
    than 8 batches, which is random batching: the demo's teacher data (105
    examples of 140 or 490 tokens, batch 16) was 60% padding that way, 4% with 8.
    """

    MIN_BATCHES_PER_MEGABATCH = 8

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        mult = min(50, max(self.MIN_BATCHES_PER_MEGABATCH, len(self.lengths) // (self.batch_size * 4)))
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=mult,
                                               generator=generator))


def batch_token_counts(batch: dict[str, Any]):
    """[tokens processed, padding tokens, response tokens, examples] of a collated batch, as a tensor.

    "Tokens processed" counts every position the model runs on, padding included,
    so padding fraction = padding / processed. Response tokens are the ones the
    loss is taken on (labels != -100 after the causal shift). The counts stay on
    the batch's device (no host sync per micro-batch); the trainer adds them up.
    """
    import torch

    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    processed = torch.tensor(input_ids.numel(), device=input_ids.device)
    padding = (mask == 0).sum() if mask is not None else torch.zeros((), dtype=torch.long, device=input_ids.device)
    response = (labels[..., 1:] != IGNORE_INDEX).sum()
    if mask is None and "position_ids" in batch:
        examples = (batch["position_ids"] == 0).sum()
    else:
        examples = torch.tensor(input_ids.shape[0], device=input_ids.device)
    return torch.stack([processed, padding, response, examples]).to(torch.long)
