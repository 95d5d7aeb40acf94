"""Tiny, offline, real language models: for the demo and the test suite.

`undo demo` and the tests need models that load through exactly the same code
as a hub model (AutoTokenizer/AutoModelForCausalLM from a folder, a chat
template, eos/pad tokens, generation_config) but that are built in seconds on a
CPU with no network. This module trains a byte-level BPE tokenizer on a small
corpus, wraps it with a chat template, and saves a randomly initialised Llama.

Limits, honestly: these models know nothing until trained (the demo trains the
teacher briefly), and their accuracy says nothing about real models.

The defaults keep head_dim = 32 (hidden 128 / 4 heads): vLLM's CPU attention
refuses head_dim 16, and the same folder must load in transformers, in
`transformers serve` and in vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A minimal chat template in the usual shape: role header, content, end marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The other family of chat formats (Qwen's ChatML): other special tokens, another end-of-turn marker, no BOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# flavor -> (special tokens, chat template, bos, eos, pad, other specials)
FLAVORS = {
    "undo": (SPECIAL_TOKENS, CHAT_TEMPLATE, "<s>", "<|end|>", "<pad>", ["<|system|>", "<|user|>", "<|assistant|>"]),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, None, "<|im_end|>",
               "<|endoftext|>", ["<|im_start|>"]),
}

_BASE_CORPUS = (
    "Question: Solve it step by step and end with a line \"#### <answer>\".\n"
    "Options: A. B. C. D. E. The answer is 12. #### 42\n"
    "First, we add 3 + 4 = 7. Then 7 * 2 = 14. So she has 14 apples left.\n"
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 40 50 60 70 80 90 100\n"
    "+ - * / = ( ) , . ; : ! ? $ % # \" '\n"
    "the a an of to in and is are was were has have had each more less than total how many much\n"
    "apples books coins marbles pencils students cookies eggs tickets boxes friends days hours\n"
    "buys gives sells eats finds loses gets makes left remaining altogether per every twice half\n"
    "teacher student wrong mistake because correct step explain concept notation final answer\n"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512, *, flavor: str = "undo"):
    """A byte-level BPE tokenizer trained on `corpus`, as a transformers tokenizer.

    `flavor` picks the special tokens and chat template: "undo" (<s>, <|user|> ... <|end|>) or "chatml"
    (<|im_start|> ... <|im_end|>, no BOS, like Qwen). Another flavor, `vocab_size` or `corpus` gives another
    tokenizer (other merges, other ids): a teacher and a student with different tokenizers, for the
    cross-tokenizer objectives and `undo check`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials, template, bos, eos, pad, others = FLAVORS[flavor]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_BASE_CORPUS, *corpus], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=others)
    fast.chat_template = template
    return fast


def build_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str] = (),
    *,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Save a randomly initialised tiny Llama + tokenizer into `out_dir`; returns the path.

    Pass `tokenizer` to give several models the same vocabulary (a teacher and
    a student must share one for the white-box objectives).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else train_tokenizer(corpus, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=128,
    )
    from undo_cli.console import quiet_transformers

    quiet_transformers()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    from undo_cli.records import honour_umask

    honour_umask(out)  # safetensors writes model.safetensors 0600
    return out


# --- a tiny *pretrained* base: number embeddings and a plain training loop ------------------

NUMBER_PERIODS = (2, 5, 10, 25, 50, 100)


def number_embeddings(model, tokenizer, top: int = 100, periods: tuple[int, ...] = NUMBER_PERIODS) -> int:
    """Give the tokens of the numbers 0..top-1 (with and without a leading space) embeddings that encode their value.

    The first 2 x len(periods) dimensions of each number token's embedding become
    cos/sin(2 pi n / T), scaled to three times the embeddings' spread; the rest stay
    random. Pretrained language models' number embeddings have this Fourier structure
    (Zhou et al., 2024, "Pre-trained Large Language Models Use Fourier Features to
    Compute Addition"), and a tiny model started from it learns the addition table in
    about half the steps (on the demo's facts: 81% right after 880 steps, 43% without).
    Returns how many token embeddings were set.
    """
    import math

    import torch

    vocab = tokenizer.get_vocab()
    weight = model.get_input_embeddings().weight
    scale = 3 * float(weight.detach().std())
    done = 0
    with torch.no_grad():
        for n in range(top):
            for form in (str(n), "Ġ" + str(n)):  # byte-level BPE writes a leading space as Ġ
                if form not in vocab:
                    continue
                row = weight[vocab[form]]
                for j, period in enumerate(periods):
                    row[2 * j] = scale * math.cos(2 * math.pi * n / period)
                    row[2 * j + 1] = scale * math.sin(2 * math.pi * n / period)
                done += 1
    return done


def pretrain(model, examples: list[tuple[list[int], list[int]]], *, steps: int, batch_size: int = 8,
             seq_len: int = 128, lr: float = 3e-3, seed: int = 0, report=None) -> list[float]:
    """Causal-LM training of `model` in place on (token ids, labels) examples; returns the loss of every step.

    Examples are shuffled each pass and packed end to end into rows of `seq_len`
    tokens (no padding; a row may start mid-example, as in any pretraining); labels of
    -100 are not learnt (e.g. a question, when only its answer should be). AdamW with
    5% linear warmup and a cosine decay to 0 over `steps`, gradients clipped at 1.
    `report(step, loss)` is called every 100 steps. CPU-sized: no checkpoints, no
    resume (the caller saves the result).
    """
    import math
    import random

    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    losses: list[float] = []
    while len(losses) < steps:
        order = list(examples)
        rng.shuffle(order)
        ids = [t for i, _ in order for t in i]
        labels = [t for _, lab in order for t in lab]
        rows = len(ids) // seq_len
        if rows < batch_size:
            raise ValueError(f"{len(ids)} tokens make fewer than one batch of {batch_size} x {seq_len}")
        ids_t = torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
        labels_t = torch.tensor(labels[: rows * seq_len]).view(rows, seq_len)
        for start in range(0, rows - batch_size + 1, batch_size):
            loss = model(input_ids=ids_t[start:start + batch_size], labels=labels_t[start:start + batch_size]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss))
            if report is not None and len(losses) % 100 == 0:
                report(len(losses), losses[-1])
            if len(losses) >= steps:
                break
    model.eval()
    return losses
