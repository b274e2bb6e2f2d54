"""Build the tiny pretrained base model that ships in ``data/tiny-base``.

``python -m sftkit.tiny build`` trains, from nothing but :mod:`sftkit.world`, a byte-level BPE tokenizer and a
small Llama-architecture causal LM on prose about the Isle of Merrow. The result is a real *base* model: it
continues text, knows the facts it read, and has never seen a chat template. It loads like any hub model::

    AutoModelForCausalLM.from_pretrained("data/tiny-base"); AutoTokenizer.from_pretrained("data/tiny-base")

The build is deterministic for a given device type (CPU runs repeat bit for bit; the shipped weights were built
on a CUDA GPU, see ``data/tiny-base/build_info.json`` for the exact command and figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from sftkit import world

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# The chat template a base model gets for SFT. `{% generation %}` marks the tokens that are the assistant's, so
# TRL's `assistant_only_loss=True` can train on those alone. Each turn ends with <|end|>, the token generation
# stops on after fine-tuning. A space follows each role tag, inside the generation block for the assistant: the
# byte-level tokenizer learned words with their leading space ("ĠHighmoor"), so an answer that began right after a
# newline would be spelled in pieces the base model has hardly seen, and SFT would have to teach it to spell.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}{{ ' ' + message['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

# Model shape: small enough to fine-tune on two CPU cores in a minute or two, big enough to hold the isle's
# 1,200 facts. Every knob is a real LlamaConfig field, so lessons transfer to Llama/Qwen-style hub models.
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
VOCAB_SIZE = 2048


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _blocks(tokenizer, docs: list[str], block: int):
    """Concatenate documents separated by EOS and cut them into equal blocks (the pretraining layout)."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def probe_knowledge(
    model, tokenizer, people: list[world.Person], device: str, max_people: int = 150
) -> float:
    """Share of held-out people whose town the base model completes correctly in gazette-note form."""
    import torch

    held = [p for p in people if p.split == "heldout"][:max_people]
    prompts = [f"Notes from the Merrow Gazette.\nQ: Where does {p.name} live?\nA:" for p in held]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    model.eval()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return sum(t.strip().startswith(p.town) for t, p in zip(texts, held, strict=True)) / max(1, len(held))


def build(
    out_dir: str | Path,
    *,
    steps: int = 3000,
    batch_size: int = 64,
    block: int = 256,
    lr: float = 2e-3,
    n_docs: int = 60000,
    n_people: int = world.N_PEOPLE,
    seed: int = world.SEED,
    device: str = "auto",
    log_every: int = 100,
) -> dict:
    """Train tokenizer and base model from scratch and write them to ``out_dir``; returns build info."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from sftkit.io import atomic_dir

    device = _pick_device(device)
    set_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()

    people = world.make_people(n_people, seed)
    docs = world.corpus(people, n_docs, seed + 7)
    chat_texts = [str(r) for r in world.alpaca_rows(people, "train", seed)]
    tokenizer = train_tokenizer(docs[:20000] + chat_texts)
    data = _blocks(tokenizer, docs, block)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **MODEL_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    cursor, losses = 0, []
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=gen), 0
        batch = data[order[cursor : cursor + batch_size]].to(device)
        cursor += batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}", flush=True)

    probe = probe_knowledge(model, tokenizer, people, device)
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|end|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {
        "command": (
            f"python -m sftkit.tiny build --steps {steps} --batch-size {batch_size} --docs {n_docs} "
            f"--lr {lr} --seed {seed} --device {device.split(':')[0]}"
        ),
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "block": block,
        "tokens_seen": steps * batch_size * block,
        "corpus_tokens": int(data.numel()),
        "n_docs": n_docs,
        "n_people": n_people,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "heldout_town_probe": round(probe, 4),
        "seconds": round(time.time() - t0, 1),
    }
    with atomic_dir(out_dir) as tmp:
        model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sftkit.tiny", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="pretrain the tiny base model (default output: data/tiny-base)")
    b.add_argument("--out", default=None)
    b.add_argument("--steps", type=int, default=3000, help="optimizer steps; a few suffice for a smoke test")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--docs", type=int, default=60000, help="documents in the generated corpus")
    b.add_argument("--lr", type=float, default=2e-3)
    b.add_argument("--seed", type=int, default=world.SEED)
    b.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    from sftkit.paths import TINY_MODEL_DIR

    info = build(
        args.out or TINY_MODEL_DIR,
        steps=args.steps,
        batch_size=args.batch_size,
        n_docs=args.docs,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
    )
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
