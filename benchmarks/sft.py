"""SFT throughput and loss: infuse (padding-free packing, assistant-only loss) vs the seed SFT recipe
(TRL ``SFTTrainer``: padded batches grouped by length, no packing, loss on the whole text).

Every side starts from the same randomly initialised Llama (hidden 256, 4 layers: big enough that
compute, not Python, dominates a step), the same tokenizer (byte-level BPE trained here) and the
same conversations (the first 160 rows of alpaca_en_demo; the last 100 held out), rendered with the
same ChatML template, and trains one epoch over them at the same batch size, learning rate,
optimizer and seed, in fp32 (``--bf16``: all in bf16 mixed precision). One epoch, so every side
sees exactly the same samples (a few steps of group_by_length would see only the longest ones: it
puts them first).

A third side runs the seed's method on a plain transformers ``Trainer`` (padded, length-grouped
batches of the same texts, loss on all of them): what SFTTrainer was when the seed was written,
without TRL 1.16's chunked log-prob LM head and per-step metrics. It tells the cost of padding and
of a whole-text loss apart from the cost of TRL itself. A fourth side is infuse without what
``infuse.packing`` adds (attention per packed sample, logits only where trained): the same batches
and loss, through sdpa's block-diagonal mask over the whole row and the LM head on every position.

Packing changes how a step's samples are laid out, not which or how many: every side takes 4
samples a step, 40 steps. The machine is shared and noisy, so all sides run in one process, one
after the other, and the whole round is repeated (``--repeats``, the order reversed each round);
every round is reported, and so is each side at its fastest round (``ratios_best_of_rounds``):
interference from other work only ever adds time, so the shortest of several runs of the same
batches is the least disturbed measure of a side (what ``timeit`` reports too). On a GPU in half
precision the first round also holds each side's kernel setup for batch lengths it has not met
before (sdpa's, not the varlen kernel's); the second round, on the same batches, does not.

The held-out loss of one run depends on the order the samples came in (the training seed; the
starting model is the same). So infuse and TRL also train with a few other seeds (``--loss-seeds``),
and their held-out assistant losses are reported side by side: equal-or-lower loss is judged on all
of them, not on one draw.

Counted on the batches each side's collator really produced:

- trained tokens: label positions that enter the loss (labels != -100, the first of each row
  excluded: nothing predicts it). infuse trains the assistant answers and their <|im_end|>; the
  seed trains every token of the text, prompts included (TRL 1.16 on a ``text`` column).
- assistant tokens: the trained tokens that are answers and their <|im_end|> (what a chat model
  is trained for), counted for the seed sides with infuse's labels of the same samples.
- real tokens: positions that are not padding; positions: all positions computed; samples.

Per second means per second of the Trainer's training loop (``train_runtime``, the same clock for
every side; no side writes a checkpoint inside it). Loss: the last logged training loss of each
side (each on its own objective), and the loss of each final model on the held-out conversations,
on assistant tokens and on all tokens.

    .venv/bin/python benchmarks/sft.py [--samples 160] [--batch-size 4] [--threads 1] [--repeats 2]
                                       [--loss-seeds 1 2 3] [--device cpu|cuda] [--bf16]
                                       [--hidden-size 256] [--layers 4] [--name sft]

On a GPU (the default where one is found) a step of the 256-wide model is bound by kernel launches,
not arithmetic; ``--hidden-size`` and ``--layers`` make it big enough to be bound by arithmetic.

Prints one JSON line and writes it to results/NAME.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from pathlib import Path

import torch
from common import DATA, random_model, save_result
from datasets import Dataset
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

import infuse.packing
import infuse.train
from infuse.config import config_from_dict
from infuse.data.formats import load_conversations
from infuse.data.sft import IGNORE_INDEX, PaddedCollator, build_sft_dataset
from infuse.data.templates import apply_template, chat_inputs, render
from infuse.tokenizer import train_tokenizer

MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
HELD_OUT = 100


class CountingCollator:
    """Wraps a collator and counts what its batches hold."""

    def __init__(self, collator, count_answers=None):
        self.collator, self.count_answers = collator, count_answers
        self.trained = self.real = self.positions = self.answers = self.samples = 0

    def __call__(self, features):
        batch = self.collator(features)
        self.samples += len(features)
        labels = batch["labels"]
        self.trained += int((labels[:, 1:] != IGNORE_INDEX).sum())
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else labels.numel()
        self.positions += labels.numel()
        if self.count_answers is not None:
            self.answers += sum(self.count_answers(feature["input_ids"]) for feature in features)
        return batch

    def counts(self, seconds: float) -> dict:
        answers = self.answers or self.trained
        return {"samples": self.samples, "trained_tokens": self.trained, "assistant_tokens": answers,
                "real_tokens": self.real, "positions": self.positions,
                "padding_share": round(1 - self.real / self.positions, 4),
                "samples_per_s": round(self.samples / seconds, 3),
                "trained_tokens_per_s": round(self.trained / seconds, 1),
                "assistant_tokens_per_s": round(answers / seconds, 1),
                "real_tokens_per_s": round(self.real / seconds, 1)}


def model_shape(hidden_size: int, layers: int) -> dict:
    """MODEL at another width and depth (heads of 64 dimensions, MLP four times as wide)."""
    return {**MODEL, "hidden_size": hidden_size, "intermediate_size": 4 * hidden_size,
            "num_hidden_layers": layers, "num_attention_heads": hidden_size // 64,
            "num_key_value_heads": hidden_size // 64}


def prepare(workdir: Path, samples: int, seed: int, shape: dict) -> tuple[Path, Path, list, list]:
    """Tokenizer (with the ChatML template), a model dir both sides start from, the train and
    held-out conversations, and the train rows written as a file for infuse."""
    tokenizer = train_tokenizer([DATA / "wiki_demo.txt", DATA / "c4_demo.jsonl"], 8000, workdir / "tokenizer")
    apply_template(tokenizer, "chatml")
    model_dir = workdir / "model"
    random_model(model_dir, shape, tokenizer, seed)
    rows = json.loads((DATA / "alpaca_en_demo.json").read_text())
    train_file = workdir / "train.json"
    train_file.write_text(json.dumps(rows[:samples]))
    held_file = workdir / "held_out.json"
    held_file.write_text(json.dumps(rows[-HELD_OUT:]))
    return model_dir, train_file, load_conversations([train_file])[0], load_conversations([held_file])[0]


def training_keys(args, output_dir: Path) -> dict:
    return {"output_dir": str(output_dir), "num_train_epochs": 1,
            "per_device_train_batch_size": args.batch_size, "learning_rate": args.lr,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
            "optim": "adamw_torch", "logging_steps": 5, "logging_first_step": True, "report_to": "none",
            "seed": args.seed, "dataloader_num_workers": 0, "disable_tqdm": True,
            "save_strategy": "no",  # no side writes a checkpoint inside the timed loop
            "use_cpu": args.device == "cpu", "bf16": args.bf16}


def run_infuse(args, model_dir: Path, train_file: Path, output_dir: Path,
               speedups: bool = True) -> tuple[dict, CountingCollator]:
    """An infuse SFT run; ``speedups=False`` leaves out what ``infuse.packing`` adds (the previous method)."""
    config = config_from_dict({
        "stage": "sft", "model_name_or_path": str(model_dir), "dataset": [str(train_file)],
        "template": "chatml", "finetuning_type": "full", "cutoff_len": args.cutoff_len,
        "overlong": "truncate", "packing": True,
        **training_keys(args, output_dir),
    })
    counter = {}

    class CountingTrainer(infuse.train.RunTrainer):  # counts the batches of the run's collator, as the run set it up
        def __init__(self, *a, data_collator, **k):
            counter["c"] = CountingCollator(data_collator)
            super().__init__(*a, data_collator=counter["c"], **k)

    def without_speedups(model, collator, label_smoothing=0.0):
        return {"sample_attention": False, "logits_where_trained": False}

    originals = infuse.train.RunTrainer, infuse.packing.prepare_sft_batches
    infuse.train.RunTrainer = CountingTrainer
    if not speedups:
        infuse.packing.prepare_sft_batches = without_speedups
    try:
        manifest = infuse.train.run(config, Console(file=io.StringIO()))
    finally:
        infuse.train.RunTrainer, infuse.packing.prepare_sft_batches = originals
    return manifest, counter["c"]


def seed_texts(conversations, tokenizer, template: str) -> list[str]:
    """Each conversation as one text in the template, as the seed's `text` rows are; it ends with the
    end-of-turn marker, which SFTTrainer is told is eos (so it adds none)."""
    return [render(tokenizer, template, *chat_inputs(c.messages, c.tools, template)).removesuffix("\n")
            for c in conversations]


def run_seed(args, model_dir: Path, train, tokenizer, template: str, output_dir: Path):
    """TRL SFTTrainer as the seed recipe used it: text rows, padding, group_by_length, no packing."""
    from trl import SFTConfig, SFTTrainer

    sft_config = SFTConfig(
        **training_keys(args, output_dir), max_length=args.cutoff_len, packing=False,
        train_sampling_strategy="group_by_length", dataset_text_field="text", eos_token="<|im_end|>",
        gradient_checkpointing=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = Dataset.from_dict({"text": seed_texts(train, tokenizer, template)})
    trainer = SFTTrainer(model=model, args=sft_config, train_dataset=texts, processing_class=tokenizer)
    trainer.data_collator = counter = CountingCollator(trainer.data_collator,
                                                       answer_counter(train, tokenizer, template))
    return trainer, trainer.train().metrics, counter


def run_plain_seed(args, model_dir: Path, train, tokenizer, template: str, output_dir: Path):
    """The seed's method on a plain transformers Trainer (what SFTTrainer did when the seed was
    written): the same texts and padded, length-grouped batches, without TRL 1.16's chunked
    log-prob LM head and per-step metrics. It tells padding costs apart from TRL's own."""
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    ids = [tokenizer(text, add_special_tokens=False, truncation=True, max_length=args.cutoff_len)["input_ids"]
           for text in seed_texts(train, tokenizer, template)]
    arguments = TrainingArguments(**training_keys(args, output_dir),
                                  train_sampling_strategy="group_by_length")
    counter = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False),
                               answer_counter(train, tokenizer, template))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model=model, args=arguments, train_dataset=Dataset.from_dict({"input_ids": ids}),
                      data_collator=counter)
    return trainer, trainer.train().metrics, counter


def answer_counter(conversations, tokenizer, template: str):
    """A function from a sample's token ids (as TRL made them: without the final newline, maybe
    truncated) to the number of its tokens infuse trains, i.e. answer tokens and <|im_end|>."""
    dataset, _ = build_sft_dataset(conversations, tokenizer, template, 10**6)
    pairs = zip(dataset["input_ids"], dataset["labels"], strict=True)
    samples = {tuple(ids): labels for ids, labels in pairs}

    def count(input_ids: list[int]) -> int:
        key = tuple(input_ids)
        labels = samples.get(key) or next(lb for ids, lb in samples.items() if ids[: len(key)] == key)
        return sum(label != IGNORE_INDEX for label in labels[1: len(key)])

    return count


@torch.no_grad()
def held_out_losses(model, tokenizer, held_out, template: str, cutoff_len: int) -> dict:
    """Mean loss of ``model`` over the held-out conversations: on assistant tokens, and on all tokens."""
    dataset, _ = build_sft_dataset(held_out, tokenizer, template, cutoff_len, overlong="truncate")
    collate = PaddedCollator(tokenizer.pad_token_id)
    totals = {"assistant": [0.0, 0], "all_tokens": [0.0, 0]}
    model.eval()
    for start in range(0, len(dataset), 8):
        batch = collate([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
        batch = {key: value.to(model.device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        everything = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        for name, labels in (("assistant", batch["labels"]), ("all_tokens", everything)):
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum",
                                                     ignore_index=IGNORE_INDEX)
            totals[name][0] += loss.item()
            totals[name][1] += int((targets != IGNORE_INDEX).sum())
    return {name: round(total / count, 4) for name, (total, count) in totals.items()}


def last_loss(log_history: list[dict]) -> float:
    return [entry["loss"] for entry in log_history if "loss" in entry][-1]


def summary(counter: CountingCollator, metrics: dict, log_history: list[dict], model, tokenizer, held_out,
            template: str, cutoff_len: int) -> dict:
    seconds = float(metrics["train_runtime"])
    return {**counter.counts(seconds), "train_seconds": round(seconds, 2),
            "last_train_loss": round(last_loss(log_history), 4),
            "held_out_loss": held_out_losses(model, tokenizer, held_out, template, cutoff_len)}


def ratios(ours: dict, other: dict) -> dict:
    """ours / other: above 1 for speeds means infuse is faster; below 1 for losses, that it is lower."""
    speeds = {key: round(ours[key] / other[key], 3)
              for key in ("trained_tokens_per_s", "assistant_tokens_per_s", "real_tokens_per_s", "samples_per_s")}
    loss = ours["held_out_loss"]["assistant"] / other["held_out_loss"]["assistant"]
    return {**speeds, "held_out_assistant_loss": round(loss, 3)}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


SIDES = ("infuse", "infuse_previous", "seed_trl_sfttrainer", "seed_method_plain_trainer")
RATIOS = ("ratios_vs_trl", "ratios_vs_plain_trainer", "ratios_vs_infuse_previous")


def run_side(name: str, args, workdir: Path, model_dir: Path, train_file: Path, train, held_out, tokenizer,
             template: str) -> dict:
    """One side trained from the same start, summarised. Every side's final model is read back from
    disk in float32 for the held-out loss: a Trainer's own model still runs under its bf16 autocast."""
    output_dir = workdir / name
    common = (tokenizer, held_out, template, args.cutoff_len)
    if name.startswith("infuse"):
        manifest, counter = run_infuse(args, model_dir, train_file, output_dir, speedups=name == "infuse")
        metrics, log_history = manifest["metrics"], manifest["log_history"]
        extra = {"steps": log_history[-1]["step"], "speedups": manifest["data"]["train"]["speedups"]}
    else:
        side = run_seed if name == "seed_trl_sfttrainer" else run_plain_seed
        trainer, metrics, counter = side(args, model_dir, train, tokenizer, template, output_dir)
        trainer.save_model(output_dir)
        log_history, extra = trainer.state.log_history, {"steps": trainer.state.global_step}
    trained = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).to(args.device)
    return {**summary(counter, metrics, log_history, trained, *common), **extra}


def one_round(sides: dict) -> dict:
    ours = sides["infuse"]
    return {**sides,
            "ratios_vs_trl": ratios(ours, sides["seed_trl_sfttrainer"]),
            "ratios_vs_plain_trainer": ratios(ours, sides["seed_method_plain_trainer"]),
            "ratios_vs_infuse_previous": ratios(ours, sides["infuse_previous"])}


def losses_by_seed(args, seeds: list[int], workdir: Path, *common) -> dict[str, list[float]]:
    """Held-out assistant loss of infuse and TRL trained with each of ``seeds`` (sample orders)."""
    losses: dict[str, list[float]] = {"infuse": [], "seed_trl_sfttrainer": []}
    for seed in seeds:
        seeded = argparse.Namespace(**{**vars(args), "seed": seed})
        for name, values in losses.items():
            values.append(run_side(name, seeded, workdir / f"seed{seed}", *common)["held_out_loss"]["assistant"])
    return losses


def compare_losses(seeds: list[int], losses: dict[str, list[float]]) -> dict:
    ours, theirs = losses["infuse"], losses["seed_trl_sfttrainer"]
    return {"seeds": seeds, "held_out_assistant_loss": losses,
            "mean": {name: round(sum(values) / len(values), 4) for name, values in losses.items()},
            "infuse_lower_or_equal": f"{sum(a <= b for a, b in zip(ours, theirs, strict=True))} of {len(seeds)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=160, help="training conversations (one epoch)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every side")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all sides, order reversed each round")
    parser.add_argument("--loss-seeds", type=int, nargs="*", default=[1, 2, 3],
                        help="more training seeds for the held-out loss comparison (infuse and TRL only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision on every side (else fp32)")
    parser.add_argument("--hidden-size", type=int, default=MODEL["hidden_size"])
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    parser.add_argument("--name", default="sft", help="the result goes to results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = model_shape(args.hidden_size, args.layers)

    rounds = []
    with tempfile.TemporaryDirectory(prefix="infuse-sft-bench-") as tmp:
        workdir = Path(tmp)
        model_dir, train_file, train, held_out = prepare(workdir, args.samples, args.seed, shape)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        template = tokenizer.chat_template
        for index in range(args.repeats):
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            sides = {name: run_side(name, args, workdir / f"round{index}", model_dir, train_file, train, held_out,
                                    tokenizer, template) for name in order}
            rounds.append({"order": list(order), **one_round({name: sides[name] for name in SIDES})})
        losses = losses_by_seed(args, args.loss_seeds, workdir, model_dir, train_file, train, held_out,
                                tokenizer, template)
        for name, values in losses.items():  # the timed rounds' seed first
            values.insert(0, rounds[0][name]["held_out_loss"]["assistant"])

    per_round = {key: {name: [r[key][name] for r in rounds] for name in rounds[0][key]}
                 for key in RATIOS}
    fastest = one_round({name: min((r[name] for r in rounds), key=lambda side: side["train_seconds"])
                         for name in SIDES})
    result = {
        "benchmark": "sft", "samples": len(train), "epochs": 1, "batch_size": args.batch_size, "lr": args.lr,
        "threads": args.threads, "cpu_count": os.cpu_count(), "device": device_name(args.device),
        "bf16": args.bf16, "model": shape,
        "data": f"alpaca_en_demo.json: first {len(train)} rows trained, last {len(held_out)} held out",
        "ratios_by_round": per_round,
        "ratios_best_of_rounds": {key: fastest[key] for key in RATIOS},
        "seconds_by_round": {name: [r[name]["train_seconds"] for r in rounds] for name in SIDES},
        "held_out_loss_by_seed": compare_losses([args.seed, *args.loss_seeds], losses),
        "rounds": rounds,
    }
    save_result(args.name, result)


if __name__ == "__main__":
    main()
