"""Checkpoints, resuming and continued fine-tuning: what a checkpoint holds and three ways to go on from one.

- :func:`build_trainer` makes the small LoRA SFT run that notebook 12 interrupts, resumes and continues; the same
  function runs in the notebook and in the ``python -m sftkit resume-demo`` subprocess, so both do identical work.
- :func:`checkpoint_files`, :func:`wait_for_checkpoint`, :func:`read_losses`: look inside a run folder.
- :class:`KeepMomentsSFTTrainer`: continued fine-tuning that keeps an earlier run's Adam moments but starts a
  *new* learning-rate schedule. ``optimizer.load_state_dict`` alone also brings back the old run's learning rate
  (``param_group["lr"]`` and ``"initial_lr"``, which a new scheduler then adopts): the 2024 complaint "loading
  the optimizer loads the learning rate as well".

    python -m sftkit resume-demo --output_dir outputs/12/run --max_steps 30 --save_steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTTrainer

from sftkit.errors import SftkitError

# Written last by Trainer._save_checkpoint (after the weights, optimizer, scheduler and RNG states): a checkpoint
# folder without it was interrupted while being written and cannot be resumed from.
TRAINER_STATE = "trainer_state.json"
LOSSES_FILE = "losses.jsonl"


@dataclass
class DemoConfig:
    """The knobs of the demo run; notebook and subprocess build the same trainer from the same values."""

    model_name: str = "data/tiny-base"
    train_file: str = "data/world/chat_train.jsonl"
    output_dir: str = "outputs/resume_demo"
    n_train: int = 400  # rows of train_file used (the first n)
    max_steps: int = 30
    save_steps: int = 10
    save_total_limit: int | None = None
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 5
    lora_r: int = 8
    seed: int = 42
    step_delay: float = 0.0  # seconds of sleep after every step: stretches a tiny run so it can be killed mid-way
    init_adapter: str | None = None  # start from this saved LoRA adapter (or checkpoint) instead of a new one


class LossLogger(TrainerCallback):
    """Append every log record (step, loss, learning_rate, ...) to ``<output_dir>/losses.jsonl`` as it happens.

    The file is flushed line by line, so a run killed with SIGKILL leaves every step it logged.
    """

    def __init__(self, path: str | os.PathLike, step_delay: float = 0.0) -> None:
        self.path = Path(path)
        self.step_delay = step_delay

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
                f.flush()

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_delay:
            time.sleep(self.step_delay)


def build_trainer(config: DemoConfig, *, trainer_cls=SFTTrainer, callbacks=(), eval_dataset=None,
                  **sft_overrides) -> SFTTrainer:
    """The demo's SFTTrainer: LoRA on the tiny model, fp32 on CPU, a loss logged at every step.

    ``sft_overrides`` replace SFTConfig fields (e.g. ``max_grad_norm=0``); ``trainer_cls`` may be a subclass such
    as :class:`KeepMomentsSFTTrainer` (extra constructor arguments go through ``functools.partial``).
    """
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig

    from sftkit.data import load_split
    from sftkit.device import choose_precision
    from sftkit.loading import load_model_and_tokenizer
    from sftkit.validation import validate_run

    prec = choose_precision("auto")
    # Seeded before the model and LoRA matrices are created: SFTTrainer wraps the model in PEFT (random LoRA A
    # matrices) before Trainer.__init__ seeds anything itself.
    set_seed(config.seed)
    train_ds = load_split(config.train_file, "train", columns=["messages"]).select(range(config.n_train))
    train_ds = train_ds.select_columns(["messages"])
    model, tokenizer = load_model_and_tokenizer(config.model_name, dtype=prec.dtype, attn_implementation="sdpa")
    kwargs = dict(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        assistant_only_loss=True,
        padding_free=True,
        max_length=None,
        logging_steps=1,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to="none",
        seed=config.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **prec.trainer_kwargs(),
    )
    kwargs.update(sft_overrides)
    if config.init_adapter:
        from peft import PeftModel

        # Continued fine-tuning: the earlier adapter's weights, trainable; SFTTrainer then gets no peft_config.
        model = PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True)
        peft_config = None
    else:
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    args = SFTConfig(**kwargs)
    # The validation layer every sftkit run goes through. A run that saves checkpoints records its fingerprint, so
    # the same run may resume in this folder and a different one is refused.
    validate_run(args, model=config.model_name, train_dataset=train_ds, tokenizer=tokenizer, peft_config=peft_config,
                 record=bool(config.save_steps))
    logger = LossLogger(Path(config.output_dir) / LOSSES_FILE, config.step_delay)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[logger, *callbacks])
    # With disable_tqdm the Trainer prints every log record; losses.jsonl already holds them.
    trainer.remove_callback(PrinterCallback)
    return trainer


# --------------------------------------------------------------------------------------------------------------
# Looking inside a run folder


def checkpoint_files(checkpoint: str | os.PathLike) -> list[tuple[str, int]]:
    """``(relative name, bytes)`` of every file in a checkpoint folder, sorted by name."""
    root = Path(checkpoint)
    if not root.is_dir():
        raise SftkitError(f"checkpoint folder {str(root)!r} does not exist.",
                          "pass a folder such as <output_dir>/checkpoint-10 (list them with sorted(Path(d).glob('checkpoint-*'))).")
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run that were written to the end (they hold trainer_state.json), by step."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / TRAINER_STATE).is_file()), key=lambda p: int(p.name.split("-")[-1]))


def wait_for_checkpoint(output_dir: str | os.PathLike, step: int, process=None, timeout: float = 120.0,
                        poll: float = 0.02) -> Path:
    """Block until ``<output_dir>/checkpoint-<step>`` is completely written; return its path.

    ``process`` (a ``subprocess.Popen``) is watched too: if it ends first, this raises instead of waiting on.
    """
    path = Path(output_dir) / f"checkpoint-{step}"
    deadline = time.monotonic() + timeout
    while not (path / TRAINER_STATE).is_file():
        if process is not None and process.poll() is not None:
            raise SftkitError(f"the training process ended (exit code {process.returncode}) before {path} was written.",
                              "read its output; check that save_steps divides the steps it runs.")
        if time.monotonic() > deadline:
            raise SftkitError(f"{path} did not appear within {timeout:.0f} s.", "raise timeout or check the run.")
        time.sleep(poll)
    return path


def read_losses(output_dir: str | os.PathLike) -> dict[int, dict]:
    """``{step: log record}`` from the run's losses.jsonl; a step logged twice (a resumed run) keeps the last."""
    path = Path(output_dir) / LOSSES_FILE
    records: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the last line of a killed run can be cut short
                    continue
                if "loss" in rec:
                    records[int(rec["step"])] = rec
    return records


# --------------------------------------------------------------------------------------------------------------
# Continued fine-tuning: keep the Adam moments, restart the schedule


def load_moments(optimizer: torch.optim.Optimizer, state_dict: dict, learning_rates: list[float] | None = None) -> None:
    """Load a saved optimizer state (moments, step counts) but keep this optimizer's learning rates.

    ``optimizer.load_state_dict`` replaces every param_group's hyperparameters, the learning rate included, and
    the saved groups also carry ``initial_lr``, which a scheduler created afterwards adopts as its base rate
    (``setdefault``). Here the current ``lr`` of each group (or ``learning_rates``) is put back and ``initial_lr``
    dropped, so a fresh scheduler starts from the new run's rate.
    """
    wanted = learning_rates or [group["lr"] for group in optimizer.param_groups]
    if len(wanted) != len(optimizer.param_groups) or len(state_dict["param_groups"]) != len(optimizer.param_groups):
        raise SftkitError(
            f"the saved optimizer has {len(state_dict['param_groups'])} parameter groups, this one "
            f"{len(optimizer.param_groups)} (learning_rates: {len(wanted)}).",
            "continue from a checkpoint of the same model with the same trainable parameters and optimizer.",
        )
    optimizer.load_state_dict(state_dict)
    for group, lr in zip(optimizer.param_groups, wanted):
        group["lr"] = lr
        group.pop("initial_lr", None)


class KeepMomentsSFTTrainer(SFTTrainer):
    """SFTTrainer that starts from a checkpoint's ``optimizer.pt`` (Adam moments) with a fresh LR schedule.

    Load the adapter/model weights yourself (e.g. ``PeftModel.from_pretrained(base, ckpt, is_trainable=True)``);
    the global step, the data order and the schedule start from zero, as in any new run. With
    ``keep_lr=False`` the saved learning rates are kept too, reproducing the 2024 pitfall.
    """

    def __init__(self, *args, optimizer_checkpoint: str | os.PathLike, keep_lr: bool = True, **kwargs) -> None:
        self.optimizer_checkpoint = Path(optimizer_checkpoint)
        self.keep_lr = keep_lr
        if not (self.optimizer_checkpoint / "optimizer.pt").is_file():
            raise SftkitError(f"{self.optimizer_checkpoint} has no optimizer.pt.",
                              "pass a checkpoint-N folder saved with save_only_model=False (the default).")
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            state = torch.load(self.optimizer_checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
            if self.keep_lr:
                load_moments(optimizer, state)
            else:
                optimizer.load_state_dict(state)  # the naive way: the old lr and initial_lr come along
        return optimizer


# --------------------------------------------------------------------------------------------------------------
# The command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sftkit resume-demo",
        description="Train the small LoRA run of notebook 12, logging every step to <output_dir>/losses.jsonl.")
    defaults = DemoConfig()
    for name, value in asdict(defaults).items():
        kind = type(value) if value is not None else (int if name == "save_total_limit" else str)
        parser.add_argument(f"--{name}", type=kind, default=value)
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="a checkpoint-N folder, or 'last' for the newest complete one in output_dir")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sftkit resume-demo``."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = DemoConfig(**{k: getattr(args, k) for k in asdict(DemoConfig())})
    resume = args.resume_from_checkpoint
    if resume == "last":
        done = complete_checkpoints(config.output_dir)
        resume = str(done[-1]) if done else None
    trainer = build_trainer(config)
    print(f"[resume-demo] pid {os.getpid()}, {config.max_steps} steps, checkpoint every {config.save_steps}"
          + (f", resuming from {resume}" if resume else ""), flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    for step, record in sorted(read_losses(config.output_dir).items()):
        print(f"[resume-demo] step {step}: loss {record['loss']:.4f}, learning rate {record['learning_rate']:.3g}")
    print(f"[resume-demo] done: step {result.global_step}, train loss {result.training_loss:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
